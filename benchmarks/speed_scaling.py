"""Re-synchronization time and peak memory versus model size, FindLady vs. the paper's method.

Models: MLPs 64 -> W -> W -> 10 of growing width W (random weights: timing does not depend on
training), EfficientNet-Lite0 and all-MiniLM-L6-v2. The suspect is the reference with every
group permuted at random (a real second copy of the tensors). Per model, in one run:

* median wall time of FindLady's solver and of the paper's Algorithm 1 over several runs
  (after one warm-up), and their ratio;
* the floor: the similarity matrix products alone (one (N x D) @ (D x N) product per member on
  the full, aligned features), timed as ``benchmarks.resync_speed.floor_seconds`` does, and
  FindLady's time over that floor;
* peak memory: in a fresh subprocess per (model, method), the increase of the peak resident set
  over the resident set once both models are loaded (peak reset through
  ``/proc/self/clear_refs``), next to the size of one model.

    python -m benchmarks speed_scaling [--quick] [--repeats 5] [--out-dir docs/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks import common

WIDTHS = (256, 512, 1024, 2048, 4096)
WIDTHS_QUICK = (64, 128)
SOLVERS = ("findlady", "paper")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def setup(name: str) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor], Any, dict[str, torch.Tensor]]:
    """(label, reference, suspect, spec, truth) for ``mlp<W>``, ``efficientnet`` or ``minilm``."""
    from findlady_core.permute import apply_permutations, random_permutations, recovering_permutations

    if name.startswith("mlp"):
        from findlady_core.trace import trace_spec
        from findlady_examples.models import MLP

        w = int(name[3:])
        torch.manual_seed(0)
        model = MLP((64, w, w, 10)).eval()
        ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
        spec = trace_spec(model, torch.zeros(1, 64))
        label = f"MLP 64-{w}-{w}-10"
    elif name == "efficientnet":
        from findlady_core.trace import trace_spec

        model = common.efficientnet_lite0()
        ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
        spec = trace_spec(model, torch.zeros(1, 3, 224, 224))
        label = "EfficientNet-Lite0"
    elif name == "minilm":
        from findlady_core.catalog import bert_spec
        from findlady_examples.pretrained import load_minilm

        _, ref = load_minilm()
        spec = bert_spec(ref)
        label = "all-MiniLM-L6-v2"
    else:
        raise SystemExit(f"unknown model {name!r}")
    q = random_permutations(spec, seed=1)
    sus = {k: v.clone() for k, v in apply_permutations(ref, spec, q).items()}  # a real second model
    truth = recovering_permutations(spec, q, {k: v.shape for k, v in ref.items()})
    return label, ref, sus, spec, truth


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, method: str, threads: int) -> dict[str, Any]:
    """Run in a fresh process: peak RSS increase of one re-synchronization over the loaded state."""
    from findlady_core.resync import resync

    common.setup_threads(threads)
    _, ref, sus, spec, _ = setup(name)
    gc.collect()
    try:  # reset the peak ("high water mark") so loading does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        how = "VmHWM after clear_refs"
        base = _status_kb("VmRSS") * 1024
        resync(ref, sus, spec, method=method, device="cpu")
        peak = _status_kb("VmHWM") * 1024
    except OSError:
        how = "ru_maxrss (includes loading)"
        base = _status_kb("VmRSS") * 1024
        resync(ref, sus, spec, method=method, device="cpu")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(v.numel() * v.element_size() for v in ref.values())
    return {"peak_increase": max(0, peak - base), "model_bytes": size, "how": how}


def measure_memory(name: str, method: str, threads: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed_scaling", "--memory-child", name, method, "--threads", str(threads)],
        check=True, capture_output=True, text=True, cwd=str(common.DEFAULT_OUT.parent.parent),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, repeats: int, threads: int, memory: bool = True) -> dict[str, Any]:
    from benchmarks.resync_speed import floor_seconds
    from findlady_core.permute import psi
    from findlady_core.resync import resync

    label, ref, sus, spec, truth = setup(name)
    resync(ref, sus, spec, device="cpu")  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {m: [] for m in SOLVERS}
    floor: list[float] = []
    psis: dict[str, float] = {}
    for _ in range(repeats):
        for method in SOLVERS:
            t = time.perf_counter()
            r = resync(ref, sus, spec, method=method, device="cpu")
            times[method].append(time.perf_counter() - t)
            psis[method] = psi(spec, truth, r.permutations)[1]
            if method == "findlady":
                floor.append(floor_seconds(ref, r.state_dict, spec))
    med = statistics.median
    row: dict[str, Any] = {
        "model": name, "label": label,
        "parameters": sum(v.numel() for v in ref.values() if v.is_floating_point()),
        "groups": len(spec.groups), "neurons": spec.neurons, "repeats": repeats,
        "s_findlady": med(times["findlady"]), "s_paper": med(times["paper"]), "s_floor": med(floor),
        "findlady_over_paper": med(times["findlady"]) / med(times["paper"]),
        "findlady_over_floor": med(times["findlady"]) / med(floor),
        "psi_findlady": psis["findlady"], "psi_paper": psis["paper"],
        "s_findlady_min": min(times["findlady"]), "s_findlady_max": max(times["findlady"]),
    }
    del ref, sus
    if memory:
        for method in SOLVERS:
            m = measure_memory(name, method, threads)
            row[f"mb_{method}"] = m["peak_increase"] / 2**20
            row["model_mb"] = m["model_bytes"] / 2**20
            row["memory_how"] = m["how"]
        row["findlady_mb_over_model"] = row["mb_findlady"] / row["model_mb"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        body.append([
            r["label"], f"{r['parameters'] / 1e6:.2f} M", r["groups"], r["neurons"],
            f"{r['s_findlady']:.3f}", f"{r['s_paper']:.3f}", f"{r['s_floor']:.3f}",
            f"{r['findlady_over_paper']:.2f}", f"{r['findlady_over_floor']:.1f}",
            f"{r.get('mb_findlady', float('nan')):.0f}", f"{r.get('mb_paper', float('nan')):.0f}",
            f"{r.get('model_mb', float('nan')):.0f}", f"{r['psi_findlady']:.2f}", f"{r['psi_paper']:.2f}",
        ])
    return common.markdown_table(
        ["model", "params", "groups", "neurons", "FindLady s (median)", "paper s (median)", "floor s (products)",
         "FindLady / paper", "FindLady / floor", "FindLady peak MB", "paper peak MB", "model MB",
         "Ψ FindLady", "Ψ paper"], body)


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = [r["parameters"] for r in rows]
    for key, color, lab in (("s_findlady", "tab:blue", "FindLady"), ("s_paper", "tab:cyan", "paper (argmax)"),
                            ("s_floor", "grey", "floor: similarity products alone")):
        a.plot(xs, [r[key] for r in rows], "o", color=color, label=lab)
    for key, color, lab in (("mb_findlady", "tab:blue", "FindLady"), ("mb_paper", "tab:cyan", "paper (argmax)"),
                            ("model_mb", "grey", "one model's size")):
        if all(key in r for r in rows):
            b.plot(xs, [max(r[key], 0.1) for r in rows], "o", color=color, label=lab)
    for r in rows:
        short = r["label"].replace("MLP 64-", "MLP ").split("-")[0] if r["model"].startswith("mlp") else r["label"]
        a.annotate(short, (r["parameters"], r["s_findlady"]), fontsize=7,
                   xytext=(3, 3), textcoords="offset points")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    a.set_ylabel("seconds (median)")
    a.set_title("(a) whole-model re-synchronization time", fontsize=9)
    b.set_ylabel("MB")
    b.set_title("(b) peak memory increase", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks speed_scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small MLPs, one repeat, one memory subprocess")
    ap.add_argument("--repeats", type=int, default=5, help="runs per model (3 for EfficientNet and MiniLM)")
    ap.add_argument("--models", nargs="+", default=None, help="e.g. mlp256 mlp1024 efficientnet minilm")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], args.memory_child[1], args.threads)))
        return 0
    common.setup_threads(args.threads)
    start = time.perf_counter()
    names = args.models or ([f"mlp{w}" for w in (WIDTHS_QUICK if args.quick else WIDTHS)]
                            + ([] if args.quick else ["efficientnet", "minilm"]))
    rows = []
    for i, name in enumerate(names):
        t = time.perf_counter()
        repeats = 1 if args.quick else (min(args.repeats, 3) if name in ("efficientnet", "minilm") else args.repeats)
        rows.append(measure(name, repeats, args.threads, memory=not args.quick or i == 0))
        log(f"speed_scaling {name}: {time.perf_counter() - t:.1f}s {rows[-1]}")
    total = time.perf_counter() - start
    md = table(rows)
    print(md)
    out = common.out_dir(args.out_dir, args.quick)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        common.write_csv(out / "speed_scaling.csv", rows)
        plot(rows, out / "speed_scaling.png")
        cmd = "python -m benchmarks speed_scaling" + (" --quick" if args.quick else "") + (
            f" --repeats {args.repeats}" if args.repeats != 5 else "")
        how = rows[0].get("memory_how", "–")
        (out / "speed_scaling.md").write_text(
            "# Re-synchronization time and memory vs. model size\n\n"
            f"Command: `{cmd}` — {common.machine()}, CPU; {total:.0f}s. Medians of {args.repeats} runs "
            "(3 for EfficientNet-Lite0 and MiniLM) after a warm-up; every group permuted, no other change. "
            f"Peak memory: increase over the loaded process, measured in a fresh subprocess ({how}).\n\n"
            + md + "\n![speed and memory](speed_scaling.png)\n")
        log(f"wrote {out / 'speed_scaling.md'}")
    log(f"speed_scaling: {total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
