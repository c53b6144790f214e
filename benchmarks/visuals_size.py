"""The dashboard's pictures on a real model: build time and size (all-MiniLM-L6-v2).

A permuted copy of MiniLM is verified with ``findlady_core.visuals.build`` as the evidence hook
(what a service job does); reported: the verify time, the time of building the pictures, the
stored document's size and the size of the largest and the default single API answer
(``visuals.view``: the group list plus one group's matrices).

    python -m benchmarks visuals_size [--quick] [--out docs/results/visuals_size.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def _size(doc: object) -> int:
    return len(json.dumps(doc, separators=(",", ":")))


def measure(quick: bool) -> dict[str, float | int | str]:
    from findlady_core import attacks, visuals
    from findlady_core.report import verify

    if quick:
        from findlady_core.spec import Spec

        g = torch.Generator().manual_seed(0)
        ref = {"fc1.weight": torch.randn(300, 8, generator=g), "fc2.weight": torch.randn(4, 300, generator=g)}
        spec = Spec.from_dict({"format": "findlady.spec/1", "groups": [{"name": "fc1", "size": 300, "members": [
            {"tensor": "fc1.weight", "axis": 0}, {"tensor": "fc2.weight", "axis": 1}]}]})
        model = "MLP 8-300-4"
    else:
        from findlady_core.catalog import bert_spec
        from findlady_examples.pretrained import load_minilm

        _, ref = load_minilm()
        spec = bert_spec(ref)
        model = "all-MiniLM-L6-v2"
    sus = attacks.permute(ref, spec, seed=1).state_dict
    docs: list[dict] = []
    build_s: list[float] = []

    def evidence(r, integ):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        docs.append(visuals.build(r, integ))
        build_s.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    report = verify(ref, sus, spec, device="cpu", null_margin=0.0, evidence=evidence)
    verify_s = time.perf_counter() - t0
    doc = docs[0]
    answers = [(_size(visuals.view(doc, g["name"])), g["name"]) for g in doc["groups"] if g["matrix"]]
    largest = max(answers)
    return {"model": model, "groups": len(spec.groups), "neurons": spec.neurons, "verdict": report["verdict"],
            "verify_s": verify_s, "build_s": build_s[0], "stored_bytes": _size(doc),
            "largest_answer_bytes": largest[0], "largest_answer_group": largest[1],
            "default_answer_bytes": _size(visuals.view(doc)), "with_matrix": len(answers)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks visuals_size", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small MLP instead of MiniLM (smoke run, prints only)")
    ap.add_argument("--out", default="docs/results/visuals_size.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    m = measure(args.quick)
    lines = [
        "# The dashboard's pictures: build time and size",
        "",
        f"`python -m benchmarks visuals_size` on {m['model']} ({m['groups']} groups, {m['neurons']} neurons, every "
        f"group permuted; verdict `{m['verdict']}`), CPU, one torch thread, {platform.processor() or platform.machine()}. "
        "The machine was shared with other jobs: times are upper bounds.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| verify, pictures included | {m['verify_s']:.1f} s |",
        f"| of which `visuals.build` | {m['build_s']:.1f} s |",
        f"| stored document (all {m['with_matrix']} groups with matrices) | {m['stored_bytes'] / 1e6:.2f} MB |",
        f"| largest single answer (`?group={m['largest_answer_group']}`) | {m['largest_answer_bytes'] / 1e6:.2f} MB |",
        f"| default answer (largest group) | {m['default_answer_bytes'] / 1e6:.2f} MB |",
        "",
        "A group of 256 neurons or more costs about 0.9 MB of JSON (two 256 x 256 matrices, 3 decimals);",
        "smaller groups cost their size squared. An answer carries one group's matrices, so it stays",
        "under about 1 MB whatever the model; the stored document grows with the number of groups.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0
