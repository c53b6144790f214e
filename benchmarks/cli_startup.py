"""How long ``findlady --help`` and ``findlady COMMAND --help`` take, against ``import torch``.

Each command line runs ``--repeats`` times in a fresh interpreter (``python -m findlady_cli``,
the console script's code path), interleaved with ``python -c "import torch"`` in the same run,
so a busy machine slows both alike. Reported: the median wall time of each, its ratio to the
median of ``import torch``, and whether the command's help loaded torch at all (checked in a
separate run through ``sys.modules``, never timed).

    python -m benchmarks cli_startup [--repeats 7] [--out docs/results/cli_startup.md]
    python -m benchmarks cli_startup --quick          # 2 repeats, a few commands, no file
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [[], ["spec", "infer"], ["spec", "check"], ["resync"], ["verify"], ["watermark", "extract"],
            ["serve"], ["worker"], ["demo"], ["audit", "verify"],
            # their help lists registries, read from torch-free declarations
            ["attack"], ["watermark", "embed"]]
QUICK = [[], ["verify"], ["serve"]]
TORCH = [sys.executable, "-c", "import torch"]
PROBE = ("import sys, contextlib, io\nfrom findlady_cli.main import main\n"
         "with contextlib.redirect_stdout(io.StringIO()):\n    main(sys.argv[1:] + ['--help'])\n"
         "print('torch' in sys.modules)")


def _time(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def _loads_torch(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def measure(commands: list[list[str]], repeats: int) -> dict[str, object]:
    times: dict[str, list[float]] = {" ".join(c) or "(none)": [] for c in commands}
    torch_times: list[float] = []
    for _ in range(repeats):  # interleaved: machine load hits every series alike
        torch_times.append(_time(TORCH))
        for c in commands:
            times[" ".join(c) or "(none)"].append(_time([sys.executable, "-m", "findlady_cli", *c, "--help"]))
    torch_median = statistics.median(torch_times)
    rows = []
    for c in commands:
        name = " ".join(c) or "(none)"
        median = statistics.median(times[name])
        rows.append({"command": f"findlady {name} --help".replace(" (none)", ""), "median_s": round(median, 3),
                     "ratio_to_import_torch": round(median / torch_median, 3), "loads_torch": _loads_torch(c)})
    return {"repeats": repeats, "import_torch_median_s": round(torch_median, 3), "commands": rows}


def markdown(result: dict[str, object]) -> str:
    lines = [f"`python -c \"import torch\"`: median {result['import_torch_median_s']} s "
             f"({result['repeats']} runs, interleaved with the commands below)", "",
             "| command | median | / import torch | loads torch |", "|---|---|---|---|"]
    for r in result["commands"]:  # type: ignore[attr-defined]
        lines.append(f"| `{r['command']}` | {r['median_s']:.3f} s | {r['ratio_to_import_torch']:.2f} | "
                     f"{'yes' if r['loads_torch'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks cli_startup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="2 repeats of 3 commands; print JSON only")
    ap.add_argument("--out", type=Path, help="also write the table as markdown here")
    args = ap.parse_args(argv)
    result = measure(QUICK if args.quick else COMMANDS, 2 if args.quick else args.repeats)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
