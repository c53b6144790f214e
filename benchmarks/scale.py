"""Real sizes: BERT-base, BERT-large and a 1.1B Llama-shaped model through the CLI.

    python -m benchmarks.scale [--models bert-base bert-large llama-1.1b] [--work DIR] [--quick]
    python -m benchmarks.scale --service        # BERT-base job through the service, upload RSS

Per model (random init, every group permuted, Gaussian noise of 0.1 std on every tensor of two
or more dimensions), one run per row, each command in a fresh process:

* **floor**: one full ``(N x D) @ (D x N)`` float32 product per member of every group (the
  least any method comparing every neuron with every other must do), timed product by product
  on prepared contiguous features;
* ``findlady resync REF SUS --spec S --truth T -o OUT`` and ``findlady verify REF SUS --spec S``
  (null computed, no ``--null-margin``): wall time end to end (process start included), peak
  RSS (the command's own ``VmHWM``, file-backed pages of the memory-mapped models included)
  over one model's file size, Psi.

Rows are kept in ``WORK/rows.json`` so that big rows can run one at a time; each run's table
goes first in ``docs/results/scale.md``, above the earlier runs' (which are kept). Models are
written once into ``WORK`` (default ``~/.cache/findlady/scale``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine

ROOT = Path(__file__).resolve().parents[1]
FINDLADY = [sys.executable, "-m", "findlady_cli.main"]
MODELS = ("bert-base", "bert-large", "llama-1.1b")
QUICK = ("bert-tiny", "llama-tiny")
NOISE = 0.1


# ---------------------------------------------------------------- models


def _bert(hidden: int, layers: int, heads: int, inter: int) -> tuple[dict[str, torch.Tensor], Any]:
    from transformers import BertConfig, BertModel

    from findlady_core.catalog import bert_spec

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter)
    sd = {k: v.detach().clone() for k, v in BertModel(cfg).state_dict().items() if v.is_floating_point()}
    return sd, bert_spec(sd, num_heads=heads)


def _llama(**shape: int) -> tuple[dict[str, torch.Tensor], Any]:
    from benchmarks.llama_spec import llama_spec, random_llama

    sd = random_llama(**shape)  # type: ignore[arg-type]
    return sd, llama_spec(sd, num_heads=shape["heads"], num_kv_heads=shape["kv_heads"])


def build(name: str) -> tuple[dict[str, torch.Tensor], Any]:
    from benchmarks.llama_spec import TINYLLAMA

    if name == "bert-base":
        return _bert(768, 12, 12, 3072)
    if name == "bert-large":
        return _bert(1024, 24, 16, 4096)
    if name == "bert-tiny":
        return _bert(128, 2, 2, 512)
    if name == "llama-1.1b":
        return _llama(**TINYLLAMA)
    if name == "llama-tiny":
        return _llama(hidden=256, layers=2, heads=8, kv_heads=2, intermediate=688, vocab=4000)
    raise SystemExit(f"unknown model {name!r}")


def make(name: str, work: Path) -> dict[str, Path]:
    """Reference, suspect (permuted, noise), spec and truth files of one model, made once."""
    from findlady_cli.truth import write_truth
    from findlady_core.attacks import attack_targets, gaussian_noise, permute
    from findlady_core.io import save_state_dict

    d = work / name
    files = {k: d / f for k, f in (("ref", "ref.safetensors"), ("sus", "sus.safetensors"),
                                   ("spec", "spec.json"), ("truth", "truth.json"))}
    if all(p.exists() for p in files.values()):
        return files
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sd, spec = build(name)
    save_state_dict(sd, files["ref"])
    spec.save(files["spec"])
    atk = permute(sd, spec, seed=1)
    write_truth(files["truth"], atk.truth)
    del sd
    noisy = gaussian_noise(atk.state_dict, NOISE, targets=attack_targets(atk.state_dict), seed=2)
    save_state_dict(noisy, files["sus"])
    print(f"{name}: models written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return files


# ---------------------------------------------------------------- measures


def floor_seconds(files: dict[str, Path]) -> tuple[float, float]:
    """Seconds and TFLOP of one float32 product per member of every group, on full features.

    Features are prepared member by member (not timed) so that a 1.1B model's 4.4 GB of
    residual-stream features never exist at once; the products alone are timed."""
    from findlady_core.io import load_state_dict
    from findlady_core.spec import Spec

    ref = load_state_dict(files["ref"], mmap=True)
    sus = load_state_dict(files["sus"], mmap=True)
    spec = Spec.load(files["spec"])
    total = flop = 0.0
    for g in spec.groups:
        for m in g.members:
            def rows(t: torch.Tensor) -> torch.Tensor:
                x = t.narrow(m.axis, m.offset, g.size * m.block).movedim(m.axis, 0)
                return x.reshape(g.size, -1).float().contiguous()
            a, b = rows(ref[m.tensor]), rows(sus[m.tensor])
            t0 = time.perf_counter()
            a @ b.T
            total += time.perf_counter() - t0
            flop += 2.0 * g.size * g.size * a.shape[1]
    return total, flop / 1e12


def measure(name: str, work: Path) -> dict[str, Any]:
    files = make(name, work)
    size = files["ref"].stat().st_size
    row: dict[str, Any] = {"model": name, "file_bytes": size}
    row["floor_s"], row["floor_tflop"] = floor_seconds(files)
    print(f"{name}: floor {row['floor_s']:.1f} s ({row['floor_tflop']:.2f} TFLOP)", file=sys.stderr)
    out = work / name / "resynced.safetensors"
    wall, rss, doc = run_rss([str(files["ref"]), str(files["sus"]), "--spec", str(files["spec"]),
                              "--truth", str(files["truth"]), "-o", str(out)], "resync")
    row.update(resync_s=wall, resync_rss=rss, psi=doc["psi"]["model"], resync_timings=doc.get("timings"),
               sweeps=doc["resync"]["sweeps"])
    print(f"{name}: resync {wall:.1f} s, Psi {row['psi']:.2f}, RSS {rss / size:.2f}x", file=sys.stderr)
    out.unlink(missing_ok=True)
    wall, rss, doc = run_rss([str(files["ref"]), str(files["sus"]), "--spec", str(files["spec"])], "verify")
    row.update(verify_s=wall, verify_rss=rss, verdict=doc["verdict"], verify_timings=doc["timings"])
    print(f"{name}: verify {wall:.1f} s ({doc['verdict']}), RSS {rss / size:.2f}x", file=sys.stderr)
    return row


# Runs the CLI and, at exit, writes its own peak RSS (VmHWM, which starts afresh at exec; a
# child's ru_maxrss would include the RSS of the benchmark process it was forked from).
_PEAK = ("import atexit, runpy, sys\n"
         "out = sys.argv.pop(1)\n"
         "def peak():\n"
         "    with open('/proc/self/status') as f, open(out, 'w') as o:\n"
         "        o.write(next(l for l in f if l.startswith('VmHWM:')).split()[1])\n"
         "atexit.register(peak)\n"
         "sys.argv[0] = 'findlady'\n"
         "runpy.run_module('findlady_cli.main', run_name='__main__')\n")


def run_rss(args: list[str], command: str) -> tuple[float, int, dict[str, Any]]:
    """Wall seconds, peak RSS (bytes) and JSON output of one ``findlady`` command in a fresh
    process; the peak is the command's own ``VmHWM``."""
    import tempfile

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    peak_file = Path(tempfile.mkstemp(prefix="findlady-peak-")[1])
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", _PEAK, str(peak_file), command, *args, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: chunks.__setitem__(k, f.read()))
               for k, f in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    code = p.wait()
    wall = time.perf_counter() - t0
    for r in readers:
        r.join()
    if code not in (0, 1):
        raise RuntimeError(f"findlady {command} failed ({code}): {chunks['err'].decode()[-3000:]}")
    peak = int(peak_file.read_text()) * 1024
    peak_file.unlink()
    return wall, peak, json.loads(chunks["out"])


# ---------------------------------------------------------------- table


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | file | floor | `resync` | ratio | `verify` | ratio | peak RSS / file (resync, verify) | Psi |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        f = r["floor_s"]
        lines.append(
            f"| {r['model']} | {r['file_bytes'] / 1e9:.2f} GB | {f:.1f} s ({r['floor_tflop']:.2f} TFLOP) "
            f"| {r['resync_s']:.1f} s | {r['resync_s'] / f:.2f}x | {r['verify_s']:.1f} s | {r['verify_s'] / f:.2f}x "
            f"| {r['resync_rss'] / r['file_bytes']:.2f}x, {r['verify_rss'] / r['file_bytes']:.2f}x | {r['psi']:.2f} |")
    return head + "\n".join(lines) + "\n"


TITLE = "# Scale benchmark (`python -m benchmarks.scale`)\n"


def record(out: Path, section: str) -> None:
    """Put a run's section first in the results file, above the earlier runs (none is lost)."""
    old = out.read_text() if out.exists() else TITLE
    body = old[len(TITLE):] if old.startswith(TITLE) else "\n" + old
    out.write_text(TITLE + "\n" + section + "\n" + body.lstrip("\n"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help=f"rows to run (default: {' '.join(MODELS)})")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("FINDLADY_CACHE_DIR", Path.home() / ".cache/findlady")) / "scale")
    ap.add_argument("--quick", action="store_true", help=f"tiny models ({' '.join(QUICK)}), nothing written to docs/")
    ap.add_argument("--service", action="store_true", help="the service rows (benchmarks.scale_service)")
    args = ap.parse_args(argv)
    if args.service:
        from benchmarks.scale_service import main as service_main

        return service_main(["--work", str(args.work)])
    names = args.models or (list(QUICK) if args.quick else list(MODELS))
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / ("rows_quick.json" if args.quick else "rows.json")
    rows = json.loads(store.read_text()) if store.exists() else {}
    for name in names:
        rows[name] = measure(name, args.work)
        store.write_text(json.dumps(rows, indent=1))
    ordered = [rows[n] for n in (*MODELS, *QUICK) if n in rows]
    text = table(ordered)
    print(text)
    if not args.quick:
        ran = [rows[n] for n in names]
        section = (f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {' '.join(names)}\n\n"
                   f"{machine()}, `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`.\n\n"
                   + table(ran) + "\n```json\n" + json.dumps(ran, indent=1) + "\n```\n")
        record(ROOT / "docs" / "results" / "scale.md", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
