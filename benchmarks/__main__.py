"""Run a benchmark by name, from a checkout: ``python -m benchmarks NAME [--quick] [options]``.

Benchmarks are not installed with the package and nothing imports them.

``python -m benchmarks all [--quick]`` runs the paper-reproduction benchmarks one after the other
(``resync_speed`` and ``whole_model_noise`` included); ``python -m benchmarks NAME --help`` lists a
benchmark's options. Full modes write ``docs/results/``; quick modes are CI smoke runs.
"""

from __future__ import annotations

import importlib
import sys
import time

NAMES = ["robustness", "watermark_ber", "integrity_scaling", "speed_scaling", "resync_speed", "whole_model_noise"]
DESCRIPTIONS = {
    "robustness": "Psi vs. noise, fine-tuning, quantization, pruning; paper's and whole-model settings (Tables 1-4)",
    "watermark_ber": "watermark bit error rate vs. attack strength, with and without re-sync (Fig. 7)",
    "integrity_scaling": "integrity attack w -> (1+k) w: task metric, detection, KL divergence (Fig. 10d, eq. 10-11)",
    "speed_scaling": "re-sync time and peak memory vs. model size, FindLady vs. paper vs. floor",
    "resync_speed": "whole-model re-sync of all-MiniLM-L6-v2: time, memory, floor",
    "whole_model_noise": "whole-model Psi under noise, ResNet-style CNN and MiniLM",
    "calibrate_null": "the verdict's similarity threshold against nulls and positives (docs/verdict.md)",
    "derive_spec": "spec of a full-size Llama-2-7B config (no weights): time and memory (docs/families.md)",
    "obfuscation": "split/dummy neurons, random rescales, in-head maps against verify (docs/obfuscation.md)",
    "obfuscation_modern": "head maps under GQA/rotary and GPT-2, SwiGLU and BatchNorm scales (docs/obfuscation.md)",
    "load": "service under load: PostgreSQL + Redis + Celery workers (docs/reliability.md)",
    "visuals_size": "the dashboard's pictures on MiniLM: build time, stored and served size",
    "rotation": "residual-stream rotations undone: held-out residual of copies vs. other seeds, verdicts (docs/obfuscation.md)",
    "cli_startup": "findlady --help and COMMAND --help against python -c 'import torch' (docs/performance.md)",
    "scale": "BERT-base, BERT-large, a 1.1B Llama through the CLI; --service: the service (docs/performance.md)",
}
# run by name only, not by 'all': the calibration is long, the load run needs the services,
# the scale run writes multi-GB models
SEPARATE = ["calibrate_null", "cli_startup", "derive_spec", "load", "obfuscation", "obfuscation_modern", "rotation",
            "scale", "visuals_size"]


def usage() -> str:
    lines = ["usage: python -m benchmarks NAME [--quick] [options]   (or: all [--quick])", "", "benchmarks:"]
    lines += [f"  {n:18s} {DESCRIPTIONS[n]}" for n in NAMES + SEPARATE]
    return "\n".join(lines)


def run(name: str, argv: list[str]) -> int:
    """Import ``benchmarks.<name>`` and call its ``main(argv)``."""
    if name not in NAMES + SEPARATE:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{name}")
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name != "all":
        return run(name, rest)
    if any(a != "--quick" for a in rest):  # the scripts' other options differ
        print("'all' takes no option but --quick", file=sys.stderr)
        return 2
    status = 0
    for n in NAMES:
        t = time.perf_counter()
        rc = run(n, rest)
        print(f"== {n}: exit {rc}, {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
