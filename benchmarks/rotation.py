"""Residual-stream rotations on random-init tiny Llama (RMSNorm, GQA, untied) and GPT-2
(pre-LayerNorm, tied): function preservation, the held-out residual of genuine copies against
models of other seeds (the calibration of ``ROTATION_THRESHOLD``), and the verdicts.

For each family the reference is seed 0 with its norm weights and biases drawn away from
their init and a 32-bit Uchida key on a stream-side weight. Positives: the reference permuted
(every group), folded and rotated by a seeded Q, then Gaussian noise of Omega * std on every
tensor of two or more dimensions. Nulls: models of other seeds, rotated by their own Q. Each
row gives the held-out residual (median Gram residual over the layers' projections, after
the Procrustes fit on the embedding tables and head) and, for some, the full verdict with the
undo, the verdict without it, and the watermark bit errors.

    python -m benchmarks rotation [--quick] [--seeds 8] [--out docs/results/rotation.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from findlady_core import attacks
from findlady_core.report import verify
from findlady_core.rotation import ROTATION_THRESHOLD, estimate_rotation, family_from_config, fold, rotate_residual
from findlady_core.watermark import detect, generate_key
from findlady_examples import tiny_transformers as tt

WM_LAYER = {"llama": "model.layers.0.self_attn.q_proj.weight", "gpt2": "transformer.h.0.mlp.c_proj.weight"}


def family(kind: str, sd: dict[str, torch.Tensor]) -> Any:
    return family_from_config(tt.CONFIGS[kind]().to_dict(), sd.keys())


def watermarked(kind: str, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """A 32-bit key read with a margin of 0.01: the smallest change of the layer's mean."""
    layer = WM_LAYER[kind]
    W = sd[layer]
    key = generate_key(layer, sd, bits=32, seed=7)
    X = key.X.double()
    target = 0.01 * (2 * key.bits.double() - 1)
    delta = X.T @ torch.linalg.solve(X @ X.T, target - X @ W.mean(0))
    return {**sd, layer: W + delta.view(1, -1)}, key


def suspect(sd: dict[str, torch.Tensor], kind: str, omega: float, *, rotate_it: bool, seed: int) -> dict[str, torch.Tensor]:
    spec = tt.SPECS[kind]()
    out = attacks.permute(sd, spec, seed=seed).state_dict
    if rotate_it:
        out, _ = rotate_residual(out, family(kind, sd), seed=seed)
    if omega:
        out = attacks.gaussian_noise(out, omega, targets=[k for k, v in out.items() if v.dim() >= 2], seed=seed)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run(kind: str, omegas: list[float], seeds: int, verdicts: bool) -> list[dict[str, Any]]:
    ref0 = tt.state_dict(kind, 0)
    ref, key = watermarked(kind, ref0)
    fam, spec = family(kind, ref), tt.SPECS[kind]()
    base = tt.logits(kind, ref0)
    rows = [{"case": "fold: logits rel. error", "value": rel(tt.logits(kind, fold(ref0, fam), tied=False), base)},
            {"case": "fold + rotate: logits rel. error",
             "value": rel(tt.logits(kind, rotate_residual(ref0, fam, seed=3)[0], tied=False), base)}]
    for omega in omegas:
        sus = suspect(ref, kind, omega, rotate_it=True, seed=3)
        est = estimate_rotation(ref, sus, fam)
        row = {"case": f"copy, permuted + rotated, noise {omega:g}", "residual": est.residual, "applied": est.applied}
        if verdicts:
            t = time.perf_counter()
            with_undo = verify(ref, sus, spec, key=key, device="cpu", rotation=fam)
            row["seconds"] = time.perf_counter() - t
            plain = verify(ref, {k: v for k, v in sus.items() if k in ref}, spec, key=key, device="cpu")
            noise_only = verify(ref, suspect(ref, kind, omega, rotate_it=False, seed=3), spec, key=key, device="cpu")
            row.update(verdict=with_undo["verdict"], bits=with_undo["watermark"]["bit_errors"],
                       verdict_no_undo=plain["verdict"], bits_no_undo=plain["watermark"]["bit_errors"],
                       verdict_noise_only=noise_only["verdict"], bits_noise_only=noise_only["watermark"]["bit_errors"])
        rows.append(row)
    for seed in range(1, seeds + 1):
        other, _ = rotate_residual(tt.state_dict(kind, seed), fam, seed=seed)
        est = estimate_rotation(ref, other, fam)
        row = {"case": f"other seed {seed}, rotated", "residual": est.residual, "applied": est.applied}
        if verdicts and seed <= 3:
            rep = verify(ref, est.state_dict, spec, key=key, device="cpu", rotation=fam)
            row.update(verdict=rep["verdict"], bits=rep["watermark"]["bit_errors"])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one noise level, two other seeds, no verdicts, no file")
    ap.add_argument("--seeds", type=int, default=8, help="models of other seeds per family")
    ap.add_argument("--out", default="docs/results/rotation.md")
    args = ap.parse_args(argv)
    omegas = [0.1] if args.quick else [0.0, 0.1, 0.3, 0.5, 1.0, 1.5]
    seeds = 2 if args.quick else args.seeds
    lines = ["# Residual-stream rotations: calibration", "",
             f"Command: `python -m benchmarks rotation` ({torch.get_num_threads()} torch thread(s), shared machine). "
             f"Threshold on the held-out residual: {ROTATION_THRESHOLD}.", ""]
    for kind in ("llama", "gpt2"):
        rows = run(kind, omegas, seeds, verdicts=not args.quick)
        lines += [f"## {kind}", "", "| case | held-out residual | undone | verdict (undo) | bit errors /32 | "
                  "verdict (no undo) | bit errors | verdict (noise only) | bit errors | verify s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "value" in r:
                lines.append(f"| {r['case']} | {r['value']:.1e} | | | | | | | | |")
                continue
            cells = [r["case"], f"{r['residual']:.3f}", "yes" if r["applied"] else "no"]
            cells += [str(r.get(k, "")) for k in ("verdict", "bits", "verdict_no_undo", "bits_no_undo",
                                                   "verdict_noise_only", "bits_noise_only")]
            cells.append(f"{r['seconds']:.1f}" if "seconds" in r else "")
            lines.append("| " + " | ".join(cells) + " |")
        nulls = [r["residual"] for r in rows if r["case"].startswith("other")]
        lines += ["", f"Lowest null residual: {min(nulls):.3f} (of {len(nulls)}); threshold {ROTATION_THRESHOLD}.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0
