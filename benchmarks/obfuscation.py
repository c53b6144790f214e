"""Structural obfuscation against ``verify``: every attack x model (docs/obfuscation.md).

Models: the bundled MLP (digits), the watermarked MNIST CNN (64-bit key on ``conv2.weight``)
and the real all-MiniLM-L6-v2 (BERT catalog spec). Attacks (``findlady attack`` flags), each
after a random permutation of every group: none, ``--split 0.1``, ``--dummy 3``,
``--scale-random``, ``--head-maps orthogonal|general`` (MiniLM), the combination, the
combination with noise 0.1, noise 0.1 alone; plus the other-seed model (MLP, CNN) obfuscated
as a negative control. Per case: the largest output difference to the reference (without
noise it must be float rounding), the verdict, the mean margin, integrity, watermark bit errors,
and the transforms ``verify`` listed.

    .venv/bin/python -m benchmarks obfuscation [--models mlp mnist_cnn minilm] [--quick] [--out docs/results/obfuscation.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from findlady_core import attack_steps
from findlady_core.report import reference_null, verify

COMBO = {"split": 0.1, "dummy": 3, "scale_random": True}
CASES: dict[str, dict[str, Any]] = {
    "permuted only": {},
    "split 0.1": {"split": 0.1},
    "dummy 3": {"dummy": 3},
    "scale-random": {"scale_random": True},
    "head maps orthogonal": {"head_maps": "orthogonal"},
    "head maps general": {"head_maps": "general"},
    "combination": COMBO,
    "combination + noise 0.1": {**COMBO, "noise": 0.1},
    "noise 0.1": {"noise": 0.1},
}
CNN_CASES = ["permuted only", "split 0.1", "dummy 3", "scale-random", "combination", "combination + noise 0.1", "noise 0.1"]
BERT_CASES = ["permuted only", "head maps orthogonal", "head maps general", "head maps general + noise 0.1", "noise 0.1"]
CASES["head maps general + noise 0.1"] = {"head_maps": "general", "noise": 0.1}


def load(name: str) -> tuple[Any, dict[str, torch.Tensor], Any, Any, Any]:
    """(forward(sd), reference, spec, key, other-seed state dict or None)."""
    from findlady_examples import models, train

    if name == "minilm":
        from findlady_core.catalog import bert_spec
        from findlady_examples.pretrained import load_minilm

        model, ref = load_minilm()
        ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
        return (lambda sd: torch.func.functional_call(model, sd, (ids,)).last_hidden_state), ref, bert_spec(ref), None, None
    from findlady_core.trace import trace_spec

    spec = trace_spec(models.build(name), models.example_input(name))
    if name == "mnist_cnn":
        _, ref, key = train.watermarked(name, 0, bits=64)
    else:
        _, ref = train.trained(name, 0)
        key = None
    x = torch.randn(16, *models.example_input(name).shape[1:], generator=torch.Generator().manual_seed(0))
    net = models.build(name)
    return (lambda sd: torch.func.functional_call(net, sd, (x,))), ref, spec, key, train.trained(name, 2)[1]


def run_case(forward: Any, ref: dict[str, torch.Tensor], spec: Any, key: Any, null: float, values: dict[str, Any]) -> dict[str, Any]:
    # the function check runs without the permutation (MiniLM's outputs are permuted with the residual stream)
    ctx = attack_steps.Context(spec, seed=5, truth={g.name: torch.arange(g.size) for g in spec.groups})
    unpermuted = attack_steps.run_pipeline(ref, values, ctx)[0] if values else ref
    err = float((forward(unpermuted) - forward(ref)).abs().max())
    ctx = attack_steps.Context(spec, seed=5, truth={g.name: torch.arange(g.size) for g in spec.groups})
    sus, _ = attack_steps.run_pipeline(ref, {"permute": ["all"], **values}, ctx)
    t0 = time.perf_counter()
    rep = verify(ref, sus, spec, key=key, device="cpu", null_margin=null)
    kinds = Counter(t["kind"] for t in rep["resync"]["transforms"])
    wm = rep["watermark"]
    return {"max_output_diff": err, "verdict": rep["verdict"], "mean_margin": rep["resync"]["similarity"]["mean_margin"],
            "integrity": rep["integrity"]["status"], "flagged": rep["integrity"]["flagged_count"],
            "bit_errors": None if wm is None else wm["bit_errors"],
            "bit_errors_before": None if wm is None else wm["bit_errors_before_resync"],
            "transforms": dict(kinds), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "mnist_cnn", "minilm"], choices=["mlp", "mnist_cnn", "minilm"])
    ap.add_argument("--quick", action="store_true", help="MLP only, three cases")
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = ["mlp"] if args.quick else args.models
    lines = ["| model | attack | max output diff (no noise) | verdict | mean margin | integrity (flagged) | "
             "watermark errors (before) | transforms listed | verify s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        forward, ref, spec, key, other = load(name)
        null = reference_null(ref, spec, device="cpu")
        todo = BERT_CASES if name == "minilm" else CNN_CASES
        if args.quick:
            todo = ["split 0.1", "dummy 3", "combination"]
        rows = [(c, run_case(forward, ref, spec, key, null, CASES[c])) for c in todo]
        if other is not None:  # negative control: the other-seed model, obfuscated, against the reference
            ctx = attack_steps.Context(spec, seed=5, truth={g.name: torch.arange(g.size) for g in spec.groups})
            sus, _ = attack_steps.run_pipeline(other, {"permute": ["all"], **COMBO}, ctx)
            t0 = time.perf_counter()
            rep = verify(ref, sus, spec, key=key, device="cpu", null_margin=null)
            rows.append(("other seed + combination (negative)", {
                "max_output_diff": None, "verdict": rep["verdict"], "mean_margin": rep["resync"]["similarity"]["mean_margin"],
                "integrity": rep["integrity"]["status"], "flagged": rep["integrity"]["flagged_count"],
                "bit_errors": None if key is None else rep["watermark"]["bit_errors"],
                "bit_errors_before": None if key is None else rep["watermark"]["bit_errors_before_resync"],
                "transforms": dict(Counter(t["kind"] for t in rep["resync"]["transforms"])),
                "seconds": time.perf_counter() - t0}))
        for case, r in rows:
            wm = "" if r["bit_errors"] is None else f"{r['bit_errors']} ({'-' if r['bit_errors_before'] is None else r['bit_errors_before']})"
            diff = "" if r["max_output_diff"] is None or "noise" in case else f"{r['max_output_diff']:.1e}"
            tr = ", ".join(f"{k} {v}" for k, v in sorted(r["transforms"].items())) or "none"
            line = (f"| {name} | {case} | {diff} | `{r['verdict']}` | {r['mean_margin']:+.3f} | {r['integrity']} ({r['flagged']}) | "
                    f"{wm} | {tr} | {r['seconds']:.1f} |")
            lines.append(line)
            print(line, file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
