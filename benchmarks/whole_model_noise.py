"""Whole-model setting: every group permuted, Gaussian noise on every weight tensor.

Psi of FindLady's method and of the paper's Algorithm 1 (greedy argmax on each layer's own
weights, groups in order), on the ResNet-style CNN and on all-MiniLM-L6-v2, in one run.

    python -m benchmarks.whole_model_noise [--quick] [--out docs/results/whole_model_noise.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

OMEGAS = (0.1, 0.5, 1.0, 2.0)


def _models(quick: bool):
    from findlady_core.catalog import bert_spec
    from findlady_core.trace import trace_spec
    from findlady_examples import models, train
    from findlady_examples.pretrained import load_minilm

    model, sd = train.trained("resnet", 0)
    yield "ResNet-style CNN (BN, residual)", sd, trace_spec(model, models.example_input("resnet"))
    if not quick:
        _, sd = load_minilm()
        yield "all-MiniLM-L6-v2", sd, bert_spec(sd)


def run(quick: bool = False) -> list[dict]:
    from findlady_core import attacks
    from findlady_core.permute import apply_permutations, psi, random_permutations, recovering_permutations
    from findlady_core.resync import resync

    rows = []
    omegas = OMEGAS[:2] if quick else OMEGAS
    for label, sd, spec in _models(quick):
        q = random_permutations(spec, seed=1)
        sus = apply_permutations(sd, spec, q)
        truth = recovering_permutations(spec, q, {k: v.shape for k, v in sd.items()})
        for omega in omegas:
            noisy = attacks.gaussian_noise(sus, omega, targets=attacks.attack_targets(sus), seed=2)
            row = {"model": label, "omega": omega, "groups": len(spec.groups), "neurons": spec.neurons}
            for method in ("findlady", "paper"):
                t = time.perf_counter()
                r = resync(sd, noisy, spec, method=method, device="cpu")
                row[f"psi_{method}"] = psi(spec, truth, r.permutations)[1]
                row[f"seconds_{method}"] = time.perf_counter() - t
            rows.append(row)
            print(row, file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet only, two strengths, no file written")
    ap.add_argument("--out", default="docs/results/whole_model_noise.md")
    args = ap.parse_args(argv)
    rows = run(args.quick)
    lines = [
        "# Whole-model re-synchronization under noise",
        "",
        "Every group permuted at random, then N(0, (Omega * std)^2) added to every floating tensor of",
        "two or more dimensions. Psi in percent (neuron-weighted over all groups).",
        f"Command: `python -m benchmarks.whole_model_noise` ({torch.get_num_threads()} torch threads).",
        "",
        "| model | groups | neurons | Omega | Psi FindLady | Psi paper (argmax) | s FindLady | s paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['groups']} | {r['neurons']} | {r['omega']} | {r['psi_findlady']:.2f} | "
            f"{r['psi_paper']:.2f} | {r['seconds_findlady']:.2f} | {r['seconds_paper']:.2f} |"
        )
    print("\n".join(lines))
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
