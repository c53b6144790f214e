"""Whole-model re-synchronization of all-MiniLM-L6-v2: time, peak memory, and the floor.

Every group of the catalog spec is permuted at random; the suspect is re-synchronized with
FindLady's method (and the paper's argmax for comparison). The floor is the time of the
similarity matrix products alone: one (N x D) @ (D x N) product per group on the full,
already-aligned member features, measured in the same run. Peak memory is the increase of the
process's peak RSS over its RSS after both models are loaded, measured in a fresh subprocess.

    python -m benchmarks.resync_speed [--quick] [--repeats 5] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup(seed: int = 1):
    from findlady_core.catalog import bert_spec
    from findlady_core.permute import apply_permutations, random_permutations, recovering_permutations
    from findlady_examples.pretrained import load_minilm

    _, ref = load_minilm()
    spec = bert_spec(ref)
    q = random_permutations(spec, seed=seed)
    sus = apply_permutations(ref, spec, q)
    sus = {k: v.clone() for k, v in sus.items()}  # a real second model, not views of the first
    truth = recovering_permutations(spec, q, {k: v.shape for k, v in ref.items()})
    return ref, sus, spec, truth


def floor_seconds(ref, aligned, spec) -> float:
    """Time of the similarity products alone: per group, full features, one product per member."""
    feats = []
    for g in spec.groups:
        for m in g.members:
            def f(t):
                x = t.narrow(m.axis, m.offset, g.size * m.block).movedim(m.axis, 0)
                return x.reshape(g.size, -1).contiguous()
            feats.append((f(ref[m.tensor]), f(aligned[m.tensor])))
    t = time.perf_counter()
    for a, b in feats:
        a @ b.T
    return time.perf_counter() - t


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_child() -> None:
    """Peak RSS increase of one resync over the RSS once both models are loaded.

    Writing 5 to /proc/self/clear_refs resets the kernel's peak (VmHWM), so the loading phase's
    own peak does not count.
    """
    import gc

    from findlady_core.resync import resync

    ref, sus, spec, _ = _setup()
    gc.collect()
    base = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    resync(ref, sus, spec, device="cpu")
    peak = _peak_rss_bytes()
    size = sum(v.numel() * v.element_size() for v in ref.values())
    print(json.dumps({"peak_increase": max(0, peak - base), "model_bytes": size}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, no file written (CI smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="docs/results/resync_speed.md")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child()
        return 0
    from findlady_core.permute import psi
    from findlady_core.resync import resync

    repeats = 1 if args.quick else args.repeats
    ref, sus, spec, truth = _setup()
    resync(ref, sus, spec, device="cpu")  # warm-up
    ours, paper, floor = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        r = resync(ref, sus, spec, device="cpu")
        ours.append(time.perf_counter() - t)
        floor.append(floor_seconds(ref, r.state_dict, spec))
        t = time.perf_counter()
        rp = resync(ref, sus, spec, device="cpu", method="paper")
        paper.append(time.perf_counter() - t)
    _, psi_ours = psi(spec, truth, r.permutations)
    _, psi_paper = psi(spec, truth, rp.permutations)
    mem = json.loads(
        subprocess.run(
            [sys.executable, "-m", "benchmarks.resync_speed", "--memory-child"],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
    )
    med = statistics.median
    row = {
        "groups": len(spec.groups),
        "neurons": spec.neurons,
        "repeats": repeats,
        "ours_median_s": med(ours),
        "paper_median_s": med(paper),
        "floor_median_s": med(floor),
        "ratio_to_floor": med(ours) / med(floor),
        "psi_ours": psi_ours,
        "psi_paper": psi_paper,
        "peak_mb": mem["peak_increase"] / 2**20,
        "two_models_mb": 2 * mem["model_bytes"] / 2**20,
        "peak_over_two_models": mem["peak_increase"] / (2 * mem["model_bytes"]),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(row, indent=1))
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            "# Whole-model re-synchronization of all-MiniLM-L6-v2\n\n"
            f"Command: `python -m benchmarks.resync_speed --repeats {repeats}"
            + (f" --threads {args.threads}" if args.threads else "") + "` "
            f"({row['threads']} torch threads, {row['cpu']}).\n\n"
            "| measure | value |\n|---|---|\n"
            + "".join(f"| {k} | {v:.4g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in row.items())
        )
    ok = row["ours_median_s"] < 5 and row["peak_over_two_models"] < 3 and row["ratio_to_floor"] < 2
    return 0 if (ok or args.quick) else 1


if __name__ == "__main__":
    sys.exit(main())
