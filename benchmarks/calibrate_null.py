"""Calibrate the verdict's "similar to the reference?" threshold (docs/verdict.md).

For each bundled architecture, the reference is the model trained from seed 0. The same
solver (``resync``) runs against

* **nulls**, suspects with no relation to the reference: models of the same architecture
  trained from other seeds; untrained models from other seeds; the reference with every
  tensor's entries randomly shuffled; random tensors with each tensor's mean and std;
* **wider and obfuscated nulls**: unrelated suspects 1.1x and 2x wider (the MLP trained wider
  from other seeds; other architectures: other-seed models with random neurons added), and
  other-seed models with split, dummy and randomly rescaled neurons (MiniLM: a shuffled copy
  with head maps);
* **positives**, permuted copies of the reference further perturbed: Gaussian noise
  (Omega = 0.5 ... 2, and 3 beyond the range we promise), uniform quantization (4-8 bits),
  magnitude pruning (50-90%), fine-tuning (10-100% of the original epochs).

The real all-MiniLM-L6-v2 (BERT catalog spec) is run too, as an architecture the threshold
was not tuned on (structureless nulls only: no second pretrained seed exists offline).

Every case runs ``canonical_resync``, the re-synchronization of ``report.verify`` with every
canonicalization step on (docs/obfuscation.md); obfuscated copies of the reference are
positives too. It prints, per case, the similarity statistic used by the verdict (neuron-weighted mean
margin, ``findlady_core.report.similarity_evidence``), the naive combined p-value of
``resync`` (for comparison), and Psi for positives; then the worst null, the weakest
positive, the threshold in force and the measured false-positive rate. On the MNIST CNN it
also reads an Uchida watermark (64 bits, on ``conv2.weight``) from every null after
re-synchronization against the watermarked reference: the bit errors the negative controls
really show once the solver has aligned them as well as it can.

    .venv/bin/python benchmarks/calibrate_null.py [--models mlp mnist_cnn vgg resnet minilm]
        [--seeds 8] [--threshold 0.03] [--json calib.json]

Results and the decision rule they support: docs/verdict.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from findlady_core import attack_steps, attacks
from findlady_core.permute import psi
from findlady_core.report import SIMILARITY_THRESHOLD, reference_null, shuffled, similarity_evidence, watermark_inputs
from findlady_core.canon.pipeline import canonical_resync
from findlady_core.spec import Spec
from findlady_core.trace import trace_spec
from findlady_examples import data, models, train

StateDict = dict[str, torch.Tensor]
WATERMARK_BITS = 64


def gaussian_like(sd: StateDict, seed: int) -> StateDict:
    """Random normal tensors with each tensor's mean and std (variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point() or v.numel() < 2:
            out[k] = v
            continue
        x = torch.randn(v.shape, generator=g) * v.float().std() + v.float().mean()
        out[k] = x.abs() if k.endswith("running_var") else x
    return out


def untrained(name: str, seed: int) -> StateDict:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in models.build(name).state_dict().items()}


def run_case(
    ref: StateDict, sus: StateDict, spec: Spec, truth: dict[str, torch.Tensor] | None, null: float, threshold: float,
    ignore: Any = (),
) -> dict[str, Any]:
    # every canonicalization step on, as report.verify runs it (widths, head maps)
    r = canonical_resync(ref, sus, spec, device="cpu", ignore=ignore)
    sim = similarity_evidence(r, null, threshold)
    out: dict[str, Any] = {
        "mean_margin": sim["mean_margin"],
        "excess": sim["mean_margin"] - null,
        "similar": sim["similar"],
        "naive_log10_p": r.log10_p_value,
        "mean_similarity": sum(g.mean_similarity * g.size for g in r.groups) / sum(g.size for g in r.groups),
        "ambiguous": sum(g.ambiguous for g in r.groups) / sum(g.size for g in r.groups),
        "resynced": r.state_dict,
    }
    if truth is not None:
        out["psi"] = psi(spec, truth, r.permutations)[1]
    out["transforms"] = len(r.transforms)
    return out


def widened(sd: StateDict, spec: Spec, factor: float, seed: int) -> StateDict:
    """``sd`` with every width group ``factor`` times wider: random neurons drawn like the
    group's own (rows with its mean and std, consumer weights with theirs), shuffled in."""
    from findlady_core.canon.widths import _blocks, width_groups
    from findlady_core.obfuscate import _widen

    out = dict(sd)
    gen = torch.Generator().manual_seed(seed)
    for g in width_groups(spec):
        m0 = g.members[0]
        n = out[m0.tensor].shape[m0.axis] // m0.block
        k = max(1, round(n * (factor - 1)))
        extra = {}
        for m in g.members:
            x = _blocks(out[m.tensor], m, n).double()
            y = torch.randn(k, *x.shape[1:], generator=gen, dtype=torch.float64) * x.std() + (x.mean() if m.is_out else 0)
            extra[m.tensor] = y.abs() if m.tensor.endswith("running_var") else y
        _widen(out, g, n, {t: v for t, v in extra.items() if any(mm.tensor == t for mm in g.out_members)},
               {t: v for t, v in extra.items() if any(mm.tensor == t for mm in g.in_members)}, gen)
    return out


def wider_trained_mlp(seed: int, factor: float) -> StateDict:
    """An MLP for digits trained from ``seed`` with hidden layers ``factor`` times wider."""
    torch.manual_seed(seed)
    m = models.MLP((64, round(128 * factor), round(64 * factor), 10))
    train_ds, _ = data.digits(0)
    train.train(m, train_ds, epochs=train.config("mlp").epochs, lr=train.config("mlp").lr, seed=seed, batch_size=64)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


OBFUSCATION = {"split": 0.1, "dummy": 2, "scale_random": True}


def obfuscated(sd: StateDict, spec: Spec, seed: int, values: dict[str, Any] | None = None) -> tuple[StateDict, Any]:
    ctx = attack_steps.Context(spec, seed=seed, truth={g.name: torch.arange(g.size) for g in spec.groups})
    out, _ = attack_steps.run_pipeline(sd, {"permute": ["all"], **(values or OBFUSCATION)}, ctx)
    return out, None


def cases(name: str, ref: StateDict, spec: Spec, seeds: int, model: torch.nn.Module) -> list[tuple[str, str, Callable[[], tuple[StateDict, Any]]]]:
    """(kind, label, make) triples; make() returns (suspect, truth or None)."""
    out: list[tuple[str, str, Callable[[], tuple[StateDict, Any]]]] = []

    def permuted(sd: StateDict, seed: int = 7) -> tuple[StateDict, Any]:
        pa = attacks.permute(sd, spec, seed=seed)
        return pa.state_dict, None

    for s in range(1, seeds + 1):
        out.append(("null", f"trained seed {s}", lambda s=s: permuted(train.trained(name, s)[1], s)))
    for s in range(1, 3):
        for f in (1.1, 2.0):
            if name == "mlp":
                out.append(("null", f"trained {f:g}x wider, seed {s}", lambda s=s, f=f: (wider_trained_mlp(s, f), None)))
            else:
                out.append(("null", f"seed {s} + random neurons {f:g}x", lambda s=s, f=f: (widened(attacks.permute(
                    train.trained(name, s)[1], spec, seed=s).state_dict, spec, f, s), None)))
        out.append(("null", f"obfuscated seed {s}", lambda s=s: obfuscated(train.trained(name, s)[1], spec, s)))
    for s in range(1, 4):
        out.append(("null", f"untrained seed {s}", lambda s=s: permuted(untrained(name, s), s)))
        out.append(("null", f"shuffled {s}", lambda s=s: (shuffled(ref, 100 + s), None)))
        out.append(("null", f"gaussian {s}", lambda s=s: (gaussian_like(ref, s), None)))

    targets = attacks.attack_targets(ref)

    def positive(f: Callable[[StateDict], StateDict], seed: int = 7) -> tuple[StateDict, Any]:
        pa = attacks.permute(ref, spec, seed=seed)
        return f(pa.state_dict), pa.truth

    out.append(("positive", "permuted only", lambda: positive(lambda sd: sd)))
    out.append(("positive", "split+dummy+scale-random", lambda: obfuscated(ref, spec, 7)))
    out.append(("positive", "noise 0.5 + split+dummy+scale", lambda: obfuscated(ref, spec, 7, {"noise": 0.5, **OBFUSCATION})))
    for om in (0.5, 1.0, 1.5, 2.0, 3.0):
        out.append(("positive" if om <= 2 else "beyond", f"noise Omega={om:g}",
                    lambda om=om: positive(lambda sd: attacks.gaussian_noise(sd, om, targets=targets, seed=1))))
    for b in (8, 6, 4):
        out.append(("positive", f"quantized {b} bits", lambda b=b: positive(lambda sd: attacks.quantize(sd, b, targets=targets))))
    for f in (0.5, 0.7, 0.8, 0.9):
        out.append(("positive", f"pruned {int(f * 100)}%", lambda f=f: positive(lambda sd: attacks.prune(sd, f, targets=targets))))
    cfg = train.config(name)
    train_ds, _ = data.load(models.info(name).dataset, cfg.data_seed)
    for fr in (0.1, 0.5, 1.0):
        def ft(fr: float = fr) -> tuple[StateDict, Any]:
            tuned = train.finetune(model, ref, train_ds, fraction=fr, original_epochs=cfg.epochs, seed=11, lr=cfg.lr)
            pa = attacks.permute(tuned, spec, seed=7)
            return pa.state_dict, pa.truth
        out.append(("positive", f"fine-tuned {int(fr * 100)}%", ft))
    return out


def calibrate(name: str, seeds: int, threshold: float, log: Callable[[str], None]) -> dict[str, Any]:
    model, ref = train.trained(name, 0)
    spec = trace_spec(models.build(name), models.example_input(name))
    null = reference_null(ref, spec, device="cpu")
    log(f"{name}: reference null mean margin {null:+.4f}, similar from {max(threshold, null + threshold):.4f}")
    rows = []
    for kind, label, make in cases(name, ref, spec, seeds, model):
        t0 = time.perf_counter()
        sus, truth = make()
        res = run_case(ref, sus, spec, truth, null, threshold)
        res.pop("resynced")
        row = {"model": name, "kind": kind, "case": label, **res, "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"{name:9s} {kind:8s} {label:20s} margin={row['mean_margin']:+.4f} similar={row['similar']!s:5s} "
            f"log10p={row['naive_log10_p']:9.1f} sim={row['mean_similarity']:.3f}"
            + (f" psi={row['psi']:.1f}" if "psi" in row else ""))
    return {"model": name, "neurons": spec.neurons, "null_margin": null, "required": max(threshold, null + threshold),
            "rows": rows}


def calibrate_minilm(threshold: float, log: Callable[[str], None]) -> dict[str, Any]:
    """An architecture outside the bundled four: the real all-MiniLM-L6-v2 (BERT catalog spec).
    No second pretrained seed exists offline, so its nulls are structureless; no fine-tuning."""
    from findlady_core.catalog import bert_spec
    from findlady_core.io import load_state_dict
    from findlady_examples.pretrained import minilm_path

    ref = load_state_dict(minilm_path() / "model.safetensors")
    spec = bert_spec(ref)
    null = reference_null(ref, spec, device="cpu")
    log(f"minilm: reference null mean margin {null:+.4f}")
    targets = attacks.attack_targets(ref)
    pa = attacks.permute(ref, spec, seed=7)
    todo: list[tuple[str, str, Callable[[], tuple[StateDict, Any]]]] = [
        ("null", "shuffled 1", lambda: (shuffled(ref, 101), None)),
        ("null", "gaussian 1", lambda: (gaussian_like(ref, 1), None)),
        ("positive", "permuted only", lambda: (pa.state_dict, pa.truth)),
        ("positive", "head maps (general), permuted", lambda: obfuscated(ref, spec, 7, {"head_maps": "general"})),
        ("positive", "head maps + noise Omega=0.5", lambda: obfuscated(ref, spec, 7, {"head_maps": "general", "noise": 0.5})),
        ("null", "shuffled 1 + head maps", lambda: obfuscated(shuffled(ref, 101), spec, 8, {"head_maps": "general"})),
        ("positive", "noise Omega=2", lambda: (attacks.gaussian_noise(pa.state_dict, 2.0, targets=targets, seed=1), pa.truth)),
        ("positive", "quantized 4 bits", lambda: (attacks.quantize(pa.state_dict, 4, targets=targets), pa.truth)),
        ("positive", "pruned 90%", lambda: (attacks.prune(pa.state_dict, 0.9, targets=targets), pa.truth)),
    ]
    rows = []
    for kind, label, make in todo:
        t0 = time.perf_counter()
        sus, truth = make()
        res = run_case(ref, sus, spec, truth, null, threshold)
        res.pop("resynced")
        row = {"model": "minilm", "kind": kind, "case": label, **res, "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"minilm    {kind:8s} {label:20s} margin={row['mean_margin']:+.4f} similar={row['similar']!s:5s}"
            + (f" psi={row['psi']:.1f}" if "psi" in row else ""))
    return {"model": "minilm", "neurons": spec.neurons, "null_margin": null,
            "required": max(threshold, null + threshold), "rows": rows}


def watermark_nulls(seeds: int, threshold: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Bit errors of unrelated MNIST CNNs after re-synchronization to the watermarked reference."""
    from findlady_core.watermark import detect

    name = "mnist_cnn"
    _, ref, key = train.watermarked(name, 0, bits=WATERMARK_BITS)
    spec = trace_spec(models.build(name), models.example_input(name))
    ignore = watermark_inputs(key, ref)  # as report.verify does with a key
    null = reference_null(ref, spec, device="cpu", ignore=ignore)
    rows = []
    for s in range(1, seeds + 1):
        _, sd = train.trained(name, s)
        sus = attacks.permute(sd, spec, seed=s).state_dict
        res = run_case(ref, sus, spec, None, null, threshold, ignore)
        before = detect(sus, key)
        after = detect(res["resynced"], key)
        rows.append({"seed": s, "mean_margin": res["mean_margin"], "similar": res["similar"],
                     "bit_errors_before": before["bit_errors"],
                     "bit_errors_after": after["bit_errors"], "p_value_after": after["p_value"]})
        log(f"watermark null seed {s}: margin={res['mean_margin']:+.4f} bit errors {before['bit_errors']} -> "
            f"{after['bit_errors']}/{WATERMARK_BITS} (p={after['p_value']:.3g})")
    return {"bits": WATERMARK_BITS, "key_seed": train.KEY_SEED, "null_margin": null, "rows": rows}


def summary(results: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    rows = [r for res in results for r in res["rows"]]
    nulls = [r for r in rows if r["kind"] == "null"]
    pos = [r for r in rows if r["kind"] == "positive"]

    def pick(r: dict[str, Any]) -> dict[str, Any]:
        return {k: r[k] for k in ("model", "case", "mean_margin", "excess")}

    return {
        "threshold": threshold,
        "nulls": len(nulls),
        "false_positives": sum(bool(r["similar"]) for r in nulls),
        "positives": len(pos),
        "missed_positives": sum(not r["similar"] for r in pos),
        "worst_null": pick(max(nulls, key=lambda r: r["mean_margin"])),
        "worst_null_excess": pick(max(nulls, key=lambda r: r["excess"])),
        "weakest_positive": pick(min(pos, key=lambda r: r["mean_margin"])),
        "weakest_positive_excess": pick(min(pos, key=lambda r: r["excess"])),
        "null_naive_log10_p_min": min(r["naive_log10_p"] for r in nulls),
        "positive_naive_log10_p_max": max(r["naive_log10_p"] for r in pos),
    }


def markdown(results: list[dict[str, Any]], summ: dict[str, Any]) -> str:
    lines = ["| model | reference null | similar from |", "|---|---|---|"]
    for res in results:
        lines.append(f"| {res['model']} | {res['null_margin']:+.4f} | {res['required']:.4f} |")
    lines += ["", "| model | kind | case | mean margin | excess over null | similar | naive log10 p | mean similarity | Psi % |",
              "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            psi_txt = f"{r['psi']:.1f}" if "psi" in r else ""
            lines.append(f"| {r['model']} | {r['kind']} | {r['case']} | {r['mean_margin']:+.4f} | {r['excess']:+.4f} | "
                         f"{'yes' if r['similar'] else 'no'} | {r['naive_log10_p']:.1f} | {r['mean_similarity']:.3f} | {psi_txt} |")
    w, we, p, pe = summ["worst_null"], summ["worst_null_excess"], summ["weakest_positive"], summ["weakest_positive_excess"]
    lines += [
        "",
        f"threshold {summ['threshold']}: {summ['false_positives']}/{summ['nulls']} nulls judged similar, "
        f"{summ['missed_positives']}/{summ['positives']} positives (Omega <= 2, 4-8 bits, 50-90% pruning, fine-tuning) missed.",
        f"worst null: mean margin {w['mean_margin']:+.4f} ({w['model']}, {w['case']}); largest excess over the reference "
        f"null {we['excess']:+.4f} ({we['model']}, {we['case']}).",
        f"weakest positive: mean margin {p['mean_margin']:+.4f} ({p['model']}, {p['case']}); smallest excess "
        f"{pe['excess']:+.4f} ({pe['model']}, {pe['case']}).",
        f"naive resync log10 p: nulls down to {summ['null_naive_log10_p_min']:.1f}, positives up to "
        f"{summ['positive_naive_log10_p_max']:.1f}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "mnist_cnn", "vgg", "resnet", "minilm"],
                    choices=["mlp", "mnist_cnn", "vgg", "resnet", "minilm"])
    ap.add_argument("--seeds", type=int, default=8, help="other training seeds per model (1..N)")
    ap.add_argument("--threshold", type=float, default=SIMILARITY_THRESHOLD)
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = [calibrate_minilm(args.threshold, log) if name == "minilm" else calibrate(name, args.seeds, args.threshold, log)
               for name in args.models]
    wm = watermark_nulls(args.seeds, args.threshold, log) if "mnist_cnn" in args.models else None
    summ = summary(results, args.threshold)
    print(markdown(results, summ))
    if wm is not None:
        errs = [r["bit_errors_after"] for r in wm["rows"]]
        print(f"\nwatermark nulls (MNIST CNN, {wm['bits']} bits): bit errors after re-synchronization "
              f"{min(errs)}-{max(errs)}, smallest p = {min(r['p_value_after'] for r in wm['rows']):.3g}")
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summ, "results": results, "watermark_nulls": wm}, f, indent=1,
                      default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
