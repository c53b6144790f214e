"""Obfuscation of modern blocks against verify: head maps under GQA and rotary (Llama), in GPT-2's
fused c_attn, scales on linear paths (SwiGLU, conv + BatchNorm) and norm weights scaled into
their readers (Llama, GPT-2), on tiny random-init
transformers folders (``findlady_examples.tiny_folders``), plus the held-out residuals an
unrelated model's fits reach (what the thresholds are calibrated against).

    .venv/bin/python -m benchmarks obfuscation_modern [--seeds 4] [--out docs/results/obfuscation_modern.md]

Per model: each attack alone and combined, with noise 0.1 and without, and the other-seed
models under the same attack (negative controls). Calibration: for every other seed, the
smallest held-out residual any head-map or scale fit reaches against the reference (on the
state ``resync`` aligned), next to the largest an attacked copy with noise 0.1 needs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from findlady_core import attack_steps
from findlady_core.canon.attention import attention_layers
from findlady_core.canon.headmaps import _fit_side, _moved, match_heads
from findlady_core.canon.scales import _fit, scale_units
from findlady_core.report import reference_null, verify
from findlady_core.resync import resync
from findlady_examples.tiny_folders import NAMES, Folder

ATTACKS = {"llama": {"head maps general": {"head_maps": "general"}, "scale linear": {"scale_linear": True},
                     "scale norms": {"scale_norms": True}},
           "gpt2": {"head maps general": {"head_maps": "general"}, "head maps orthogonal": {"head_maps": "orthogonal"},
                    "scale norms": {"scale_norms": True}},
           "resnet": {"scale linear": {"scale_linear": True}}}


def _attack(f: Folder, sd: dict[str, torch.Tensor], values: dict[str, Any]) -> dict[str, torch.Tensor]:
    ctx = attack_steps.Context(f.spec, seed=3, truth={g.name: torch.arange(g.size) for g in f.spec.groups})
    return attack_steps.run_pipeline(sd, {"permute": ["all"], **values}, ctx)[0]


def fit_residuals(ref: Folder, sus: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Smallest held-out residual of any head-map fit and of any neuron's scale fit."""
    r = resync(ref.sd, sus, ref.spec, device="cpu").state_dict
    heads, scales = float("inf"), float("inf")
    for L in attention_layers(ref.spec):
        p_kv, p_q = match_heads(ref.sd, r, L)
        moved = _moved(r, L, p_kv, p_q)
        for g in range(L.kv_heads):
            for side in ("qk", "vo") if L.qk != "pinned" else ("vo",):
                heads = min(heads, _fit_side(ref.sd, moved, L, side, g).residual)
    for u in scale_units(ref.spec, {k: v.shape for k, v in ref.sd.items()}):
        scales = min(scales, float(_fit(ref.sd, r, u)[1].min()))
    return heads, scales


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="other-seed models per family (negative controls)")
    ap.add_argument("--quick", action="store_true", help="one other seed")
    ap.add_argument("--out", help="write the markdown tables here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    lines = ["| model | attack | verdict | mean margin | integrity (flagged) | transforms listed | max residual | verify s |",
             "|---|---|---|---|---|---|---|---|"]
    calib = ["| model | other seed | smallest unrelated head-map residual | smallest unrelated scale residual |",
             "|---|---|---|---|"]
    tmp = Path(tempfile.mkdtemp())
    for name in NAMES:
        ref = Folder(name, tmp / f"{name}-0", 0)
        null = reference_null(ref.sd, ref.spec, device="cpu")
        cases = dict(ATTACKS[name])
        combo = {k: v for c in cases.values() for k, v in c.items()}
        cases["combination"] = combo
        cases["combination + noise 0.1"] = {**combo, "noise": 0.1}
        cases["noise 0.1"] = {"noise": 0.1}
        others = [Folder(name, tmp / f"{name}-{s}", s) for s in range(1, seeds + 1)]
        rows = [(c, ref.sd, v) for c, v in cases.items()]
        rows += [(f"other seed {i + 1} + combination (negative)", o.sd, combo) for i, o in enumerate(others)]
        for case, base, values in rows:
            sus = _attack(ref, base, values)
            t0 = time.perf_counter()
            rep = verify(ref.sd, sus, ref.spec, device="cpu", null_margin=null)
            seconds = time.perf_counter() - t0
            found = [t for t in rep["resync"]["transforms"] if t["kind"] in ("head_map", "scale", "norm_fold")]
            kinds = Counter(t["kind"] for t in found)
            worst = max((t["residual"] for t in found if t["residual"] is not None), default=None)
            line = (f"| {name} | {case} | `{rep['verdict']}` | {rep['resync']['similarity']['mean_margin']:+.3f} | "
                    f"{rep['integrity']['status']} ({rep['integrity']['flagged_count']}) | "
                    f"{', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or 'none'} | "
                    f"{'' if worst is None else f'{worst:.1e}'} | {seconds:.1f} |")
            lines.append(line)
            print(line, file=sys.stderr, flush=True)
        for i, o in enumerate(others):
            h, s = fit_residuals(ref, _attack(ref, o.sd, combo))
            calib.append(f"| {name} | {i + 1} | {'-' if h == float('inf') else f'{h:.3f}'} | "
                         f"{'-' if s == float('inf') else f'{s:.3f}'} |")
            print(calib[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n\n" + "\n".join(calib) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
