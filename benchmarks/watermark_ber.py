"""Watermark bit error rate under the four attacks, with and without re-synchronization (Fig. 7).

A 64-bit Uchida watermark is embedded in ``conv2.weight`` of the MNIST CNN (``train.watermarked``).
Each attack hits every weight tensor; the bits are then read

* from the attacked model itself (how robust the watermark is, no permutation);
* after every group is permuted (permuting ``conv1`` reorders ``conv2``'s input channels, which
  scrambles the key's projection: about half the bits flip);
* after that permuted copy is re-synchronized to the reference, by FindLady and by the paper's
  Algorithm 1 (the paper's "counter-attack").

The paper plots a correlation; we plot the bit error rate (BER, %), which is what the verdict's
binomial test uses (``findlady_core.watermark``). 50 % is chance.

    python -m benchmarks watermark_ber [--quick] [--seeds 3] [--out-dir docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

from benchmarks import common
from benchmarks.common import ATTACK_LABELS, ATTACKS

GRID: dict[str, list[float]] = {
    "noise": [0, 0.1, 0.2, 0.5, 1, 2, 5, 10],
    "finetune": [2, 4, 6, 8, 10],
    "quantize": [16, 8, 6, 5, 4, 3, 2],
    "prune": [0, 0.5, 0.7, 0.9, 0.95, 0.99],
}
GRID_QUICK: dict[str, list[float]] = {"noise": [0, 1], "finetune": [2], "quantize": [4], "prune": [0.9]}
CONDITIONS = ("attacked", "permuted", "resync_findlady", "resync_paper")
CONDITION_LABELS = {"attacked": "attack only (no permutation)", "permuted": "permuted, no re-sync",
                    "resync_findlady": "permuted + FindLady re-sync", "resync_paper": "permuted + paper re-sync"}
PERM_SEED, ATTACK_SEED, FT_SEED = 1000, 2000, 3000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def watermarked(name: str, seed: int) -> tuple[common.Subject, Any]:
    """A subject (model, spec, error metric, fine-tuning) trained with a 64-bit key, and the key.

    The MNIST CNN carries the key on ``conv2.weight`` (its default); the MLP (quick mode) on
    ``layers.2.weight``, whose input columns move with ``layers.0``'s neurons.
    """
    from findlady_core.trace import trace_spec
    from findlady_examples import data, models, train

    layer = None if name == "mnist_cnn" else "layers.2.weight"
    model, sd, key = train.watermarked(name, seed, bits=64, layer=layer)
    spec = trace_spec(model, models.example_input(name))
    cfg = train.config(name)
    train_ds, test_ds = data.load(models.info(name).dataset, cfg.data_seed)
    err = common.ClassifierError(model, sd, test_ds)
    metric = common.Metric("error", "%", False, err, goodness=lambda v: 100.0 - v)

    def finetune(state: dict[str, Any], fraction: float, ft_seed: int) -> dict[str, Any]:
        return train.finetune(model, state, train_ds, fraction=fraction, original_epochs=cfg.epochs,
                              seed=ft_seed, lr=cfg.lr, batch_size=cfg.batch_size)  # task loss only

    subject = common.Subject(name, "MNIST CNN" if name == "mnist_cnn" else "MLP (digits)", seed, sd, spec,
                             common.group_of(spec, models.info(name).penultimate), metric, finetune)
    return subject, key


def run(name: str, seeds: int, grid: dict[str, list[float]]) -> list[dict[str, Any]]:
    from findlady_core import attacks
    from findlady_core.resync import resync
    from findlady_core.watermark import detect

    rows = []
    for seed in range(seeds):
        t = time.perf_counter()
        subject, key = watermarked(name, seed)
        sd, spec = subject.state_dict, subject.spec
        targets = attacks.attack_targets(sd)
        clean = subject.metric(sd)
        ft: dict[float, Any] = {}
        prev, state = 0.0, sd
        for theta in sorted(grid.get("finetune", [])):
            state = subject.finetune(dict(state), (theta - prev) / 100.0, FT_SEED + seed + int(theta * 10))
            ft[theta] = state
            prev = theta
        for attack in ATTACKS:
            for strength in grid.get(attack, []):
                attacked = ft[strength] if attack == "finetune" else common.apply_attack(
                    sd, attack, strength, targets, ATTACK_SEED + seed)
                pa = attacks.permute(attacked, spec, None, seed=PERM_SEED + seed)
                states = {
                    "attacked": attacked,
                    "permuted": pa.state_dict,
                    "resync_findlady": resync(sd, pa.state_dict, spec, device="cpu").state_dict,
                    "resync_paper": resync(sd, pa.state_dict, spec, method="paper", device="cpu").state_dict,
                }
                row: dict[str, Any] = {"model": name, "seed": seed, "attack": attack, "strength": strength,
                                       "error": subject.metric(attacked), "clean_error": clean, "bits": key.T}
                for c, st in states.items():
                    d = detect(st, key)
                    row[f"ber_{c}"] = 100.0 * d["bit_errors"] / d["bits"]
                    row[f"detected_{c}"] = int(d["detected"])
                rows.append(row)
        log(f"watermark_ber {name} seed {seed}: {time.perf_counter() - t:.1f}s")
    return rows


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, list[float]]]:
    agg: dict[tuple[str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        a = agg[(r["attack"], r["strength"])]
        for k, v in r.items():
            if k.startswith(("ber_", "detected_")) or k == "error":
                a[k].append(v)
    return agg


def table(rows: list[dict[str, Any]]) -> str:
    agg = aggregate(rows)
    body = []
    for attack in ATTACKS:
        for s in common.severity_order(attack, {k[1] for k in agg if k[0] == attack}):
            a = agg[(attack, s)]
            body.append([ATTACK_LABELS[attack], f"{s:g}", common.fmt_ms(a["error"]),
                         *[common.fmt_ms(a[f"ber_{c}"], 1) for c in CONDITIONS],
                         f"{sum(a['detected_resync_findlady'])}/{len(a['detected_resync_findlady'])}"])
    return common.markdown_table(
        ["attack", "strength", "err % (↓)", *[f"BER % {CONDITION_LABELS[c]}" for c in CONDITIONS],
         "detected after FindLady (p < 1e-6)"], body)


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    plt = common.pyplot()
    agg = aggregate(rows)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    styles = {"attacked": ("k", ":"), "permuted": ("tab:orange", "-"), "resync_findlady": ("tab:blue", "-"),
              "resync_paper": ("tab:cyan", "--")}
    for ax, attack in zip(axes, ATTACKS):
        xs = common.severity_order(attack, {k[1] for k in agg if k[0] == attack})
        if not xs:
            ax.set_visible(False)
            continue
        pos = list(range(len(xs)))  # evenly spaced, mildest first
        for c in CONDITIONS:
            color, ls = styles[c]
            ax.plot(pos, [common.mean_std(agg[(attack, x)][f"ber_{c}"])[0] for x in xs], "o", ls=ls, color=color,
                    ms=3, label=CONDITION_LABELS[c])
        ax.axhline(50, color="grey", lw=0.5)
        ax.set_ylim(-2, 70)
        ax.set_xlabel(ATTACK_LABELS[attack])
        ax.set_xticks(pos, [f"{x:g}" for x in xs], fontsize=7)
        ax.set_ylabel("bit error rate (%)")
        ax2 = ax.twinx()
        ax2.plot(pos, [common.mean_std(agg[(attack, x)]["error"])[0] for x in xs], "s--", ms=3, color="tab:red")
        ax2.set_ylabel("err % (model)", color="tab:red", fontsize=8)
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Uchida watermark (64 bits) under the four attacks, every layer attacked and permuted", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks watermark_ber", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="watermarked MLP, one seed, one strength per attack")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    common.setup_threads(args.threads)
    start = time.perf_counter()
    name = "mlp" if args.quick else "mnist_cnn"
    rows = run(name, 1 if args.quick else args.seeds, GRID_QUICK if args.quick else GRID)
    total = time.perf_counter() - start
    md = table(rows)
    print(md)
    out = common.out_dir(args.out_dir, args.quick)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        common.write_csv(out / "watermark_ber.csv", rows)
        plot(rows, out / "watermark_ber.png")
        seeds = len({r["seed"] for r in rows})
        cmd = "python -m benchmarks watermark_ber" + (" --quick" if args.quick else "") + (
            f" --seeds {args.seeds}" if args.seeds != 3 else "")
        (out / "watermark_ber.md").write_text(
            "# Watermark bit error rate vs. attack strength (paper Fig. 7)\n\n"
            f"Command: `{cmd}` — {common.machine()}; {total:.0f}s.\n\n"
            f"{rows[0]['model']} with a 64-bit Uchida key, {seeds} model seed(s) (mean ± std). Every weight tensor is "
            "attacked and every group permuted; 50 % BER is chance.\n\n" + md + "\n![watermark BER](watermark_ber.png)\n")
        log(f"wrote {out / 'watermark_ber.md'}")
    log(f"watermark_ber: {total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
