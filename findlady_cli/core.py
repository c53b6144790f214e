"""Commands over the core library: ``spec infer|check``, ``attack``, ``resync``, ``verify``.

Only ``spec infer --module`` imports and runs code, the user's own module (the current
directory is put on ``sys.path`` first, as ``python -m`` does); weight, spec, truth and key
files are read as data only.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from findlady_cli import common
from findlady_cli.common import DEVICES, emit_json, fmt, table

POSITIVE_VERDICTS = ("match", "match_modified")


def _family_names() -> list[str]:
    from findlady_core import families

    return families.names()


def register(sub: argparse._SubParsersAction, add: Callable[..., argparse.ArgumentParser]) -> None:
    from findlady_cli.main import group

    specs = group(sub, "spec", "make or check a permutation spec (findlady.spec/1)",
                  "Permutation specs say which tensor axes share one permutation.")
    add(specs, "infer", "write the spec of a model (traced from its module, or guessed from its weights)",
        "Trace the spec of a torch.nn.Module (best: residual connections and flattens are found\n"
        "exactly and the spec is self-checked by permuting every group and comparing outputs),\n"
        "or infer it from weights: a model folder's config.json names the architecture (BERT,\n"
        "with its num_attention_heads); a bare file gets the architecture family its tensor\n"
        "names match (BERT: heads only with --num-heads), or a plain chain of layers guessed\n"
        "from names and shapes (a warning), or exit 2 listing the known families. --module\n"
        "imports and runs your code; weight files and folders are only read as data.",
        cmd_spec_infer, _spec_infer_options)
    add(specs, "check", "validate a spec against a weight file",
        "Check that every tensor of the spec exists in the weights, is floating point and is\n"
        "long enough, and that no two groups overlap badly.", cmd_spec_check, _spec_check_options)
    # the description lists the registered attacks: written when the command is chosen
    add(sub, "attack", "permute and perturb a model (make a test suspect)", "", cmd_attack, _attack_options)
    add(sub, "resync", "put a suspect's neurons back in the reference order",
        "Re-synchronize SUS to REF on every group of the spec (one bijection per group) and\n"
        "print, per group, how many neurons moved, the matched similarity and the margin to the\n"
        "best alternative. With --truth (from 'attack --truth') also print Psi, the success\n"
        "rate: 100 * share of neurons put back at their true place.", cmd_resync, _resync_options)
    add(sub, "verify", "full check of a suspect: resync, integrity, watermark, verdict",
        "Re-synchronize SUS to REF, check the integrity of every neuron, read the watermark\n"
        "(with --key) and print the verdict. Exit 0 for match / match_modified, 1 for\n"
        "no_match / inconclusive, 2 for bad input. --json prints the findlady.report/2 document.",
        cmd_verify, _verify_options)


# ---------------------------------------------------------------- options


def _spec_infer_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--module", metavar="PKG.MOD:FACTORY",
                     help="import PKG.MOD (the current directory is on sys.path) and call FACTORY() for the nn.Module")
    src.add_argument("--weights", metavar="W", help="weight file (safetensors or torch.save zip) or model folder "
                     "(config.json + model.safetensors, or shards + index) to infer the spec from")
    p.add_argument("--input-shape", type=common.shape, metavar="1,3,32,32",
                   help="shape of the example input for --module (batch first), filled with torch.randn")
    p.add_argument("--input-ids", type=common.shape, metavar="1,16",
                   help="for --module: an integer input of this shape (token ids), drawn below the vocabulary "
                   "size of the module's first nn.Embedding")
    p.add_argument("--num-heads", type=common.positive_int, metavar="N",
                   help="with --weights: attention heads per layer (a bare BERT file gets head groups only with it; "
                   "a folder's config.json says it)")
    # No argparse ``choices``: help would list them, importing the registry and torch with it;
    # the handler checks the name against the registry instead (exit 2, naming the known ones).
    p.add_argument("--family", metavar="NAME",
                   help="with --weights: force a registered architecture family, e.g. bert (default: detect)")
    p.add_argument("-o", "--output", required=True, metavar="SPEC", help="where to write the spec JSON")


def _spec_check_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("weights", metavar="WEIGHTS")


def _attack_options(p: argparse.ArgumentParser) -> None:
    from findlady_core.attack_steps import REGISTRY

    p.description = _attack_description(REGISTRY.values())
    p.add_argument("reference", metavar="REF", help="reference weight file")
    p.add_argument("-o", "--output", required=True, metavar="SUS", help="where to write the suspect (.pt: torch.save, else safetensors)")
    p.add_argument("--spec", required=True, metavar="SPEC", help="permutation spec of the model")
    for attack in REGISTRY.values():
        for o in attack.options:
            if o.type == "names":
                p.add_argument(o.flag, nargs="+", action="extend", metavar=o.metavar, help=o.help)
            elif o.type == "flag":  # given: True; absent: None (the pipeline runs what is not None)
                p.add_argument(o.flag, action="store_const", const=True, default=None, help=o.help)
            else:
                p.add_argument(o.flag, type=common.VALUE_TYPES[o.type], metavar=o.metavar, help=o.help)
    p.add_argument("--group", metavar="NAME", help="limit noise/quantize/prune to this group's own parameters; the group of --scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation and of the noise")
    p.add_argument("--truth", metavar="TRUTH.json", help="write the recovering permutations (findlady.truth/1)")


def _attack_description(attacks: Iterable[Any]) -> str:
    """The step list of ``findlady attack --help``, one line per registered attack, in order."""
    steps = [f"  {i}. {a.doc}" for i, a in enumerate(sorted(attacks, key=lambda a: a.step), 1)]
    return ("Make a suspect from a reference. Steps, in this order:\n" + "\n".join(steps) + "\n"
            "Noise, quantization and pruning hit --group's own parameters when given, else every\n"
            "floating tensor of two or more dimensions. --truth writes the recovering permutation of\n"
            "every group.")


def _resync_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF", help="reference weight file")
    p.add_argument("suspect", metavar="SUS", help="suspect weight file")
    p.add_argument("--spec", required=True, metavar="SPEC", help="permutation spec of the model")
    p.add_argument("-o", "--output", metavar="RESYNCED", help="write the re-synchronized suspect here")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to compute (auto: CUDA when present)")
    p.add_argument("--method", choices=("findlady", "paper"), default="findlady",
                   help="findlady: whole model, assignment solver; paper: Algorithm 1 (greedy argmax, for comparison)")
    p.add_argument("--truth", metavar="TRUTH.json", help="true recovering permutations: print Psi")


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF", help="reference weight file")
    p.add_argument("suspect", metavar="SUS", help="suspect weight file")
    p.add_argument("--spec", required=True, metavar="SPEC", help="permutation spec of the model")
    p.add_argument("--key", metavar="KEY", help="watermark key of the reference (safetensors, findlady.key/1)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to compute (auto: CUDA when present)")
    p.add_argument("--alpha", type=common.probability, help="watermark p-value threshold (default: the report's, 1e-6)")
    p.add_argument("--tolerance", type=common.nonneg,
                   help="integrity tolerance on a neuron's norm ratio and cosine (default: the report's)")
    p.add_argument("--null-margin", type=common.finite, metavar="X",
                   help="the reference's null mean margin, from an earlier run; skips computing it "
                   "(the report's timings then show null 0)")
    p.add_argument("--undo-rotation", metavar="CONFIG",
                   help="the model's config.json (or its folder): estimate a residual-stream rotation of SUS, "
                   "check it on held-out weights and undo it before re-synchronizing")


# ---------------------------------------------------------------- spec


def _import_factory(target: str) -> Callable[[], Any]:
    """``pkg.mod:factory`` (``factory`` may be dotted: ``Class.method``) -> the callable."""
    from findlady_core.errors import InputError

    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"--module must look like pkg.mod:factory, got {target!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does: the user's own package in the current directory
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"cannot import module {mod_name!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InputError(f"module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise InputError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


def cmd_spec_infer(args: argparse.Namespace) -> int:
    import torch

    from findlady_core.errors import InputError

    caught: list[str] = []
    common.check_output(args.output)
    if args.module:
        if args.family:
            raise InputError("--family goes with --weights, not --module")
        if args.num_heads:
            raise InputError("--num-heads goes with --weights, not --module")
        if bool(args.input_shape) == bool(args.input_ids):
            raise InputError("--module needs one of --input-shape (floats, e.g. 1,3,32,32) or --input-ids (token ids, e.g. 1,16)")
        from findlady_core.trace import trace_spec

        factory = _import_factory(args.module)
        try:
            module = factory()
        except Exception as e:  # the user's code: report its failure as bad input, with its message
            raise InputError(f"{args.module}() failed: {type(e).__name__}: {e}") from None
        if not isinstance(module, torch.nn.Module):
            raise InputError(f"{args.module}() returned {type(module).__name__}, not a torch.nn.Module")
        gen = torch.Generator().manual_seed(0)
        if args.input_ids:
            example = torch.randint(0, _vocabulary(module), args.input_ids, generator=gen)
        else:
            example = torch.randn(args.input_shape, generator=gen)
        spec = trace_spec(module, example)
        source = "traced, self-checked"
    else:
        if args.input_shape or args.input_ids:
            raise InputError("--input-shape and --input-ids go with --module, not --weights")
        from findlady_core.choose import spec_for
        if args.family is not None and args.family not in _family_names():
            raise InputError(f"unknown family {args.family!r}; known: {', '.join(_family_names())}")

        sd, folder = common.load_model(args.weights)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            spec = spec_for(sd, folder.config if folder else None, num_heads=args.num_heads, family=args.family)
        caught = [str(x.message) for x in w if issubclass(x.category, UserWarning)] + list(spec.warnings)
        for msg in caught:
            common.warn(args, msg)
        meta = dict(spec.meta or {})
        source = str(meta.get("source") or (f"catalog {meta['family']}" if meta.get("family") else "inferred"))
    spec.save(args.output)
    if args.json:
        emit_json({"spec": args.output, "source": source, "groups": len(spec.groups),
                   "neurons": spec.neurons, "warnings": caught,
                   "group_sizes": {g.name: g.size for g in spec.groups}})
    else:
        print(f"wrote {args.output}: {len(spec.groups)} groups, {spec.neurons} neurons ({source})")
        _print_groups(spec)
    return 0


def _vocabulary(module: Any) -> int:
    """Token ids must index the first embedding table (the word embeddings of a language model)."""
    import torch

    from findlady_core.errors import InputError

    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            return int(m.num_embeddings)
    raise InputError("--input-ids needs an nn.Embedding in the module to bound the ids; use --input-shape")


def _print_groups(spec: Any, limit: int = 30) -> None:
    rows = [(g.name, g.size, len(g.members)) for g in spec.groups[:limit]]
    table(rows, ("group", "size", "members"))
    if len(spec.groups) > limit:
        print(f"... and {len(spec.groups) - limit} more groups")


def cmd_spec_check(args: argparse.Namespace) -> int:
    sd = common.load_weights(args.weights)
    spec = common.load_spec(args.spec, sd)
    if args.json:
        emit_json({"valid": True, "groups": len(spec.groups), "neurons": spec.neurons})
    else:
        print(f"{args.spec} fits {args.weights}: {len(spec.groups)} groups, {spec.neurons} neurons")
    return 0


# ---------------------------------------------------------------- attack


def cmd_attack(args: argparse.Namespace) -> int:
    import json

    import torch

    from findlady_cli.truth import write_truth
    from findlady_core import attack_steps
    from findlady_core.errors import InputError

    dests = [o.dest for a in attack_steps.REGISTRY.values() for o in a.options]
    values = {k: getattr(args, k) for k in dests}
    attack_steps.check_values(values, args.group)
    if common.same_file(args.output, args.reference):
        raise InputError("the output would overwrite the reference; choose another -o")
    if args.truth and (common.same_file(args.truth, args.reference) or common.same_file(args.truth, args.output)):
        raise InputError("--truth must be a file of its own")
    common.check_output(args.truth)
    bars = common.bars(args)
    ((ref, folder),) = common.load_models([args.reference], bars)
    common.check_model_output(args.output, folder)
    spec = common.load_spec(args.spec, ref)
    for name in [n for n in (args.permute or []) if n != "all"] + ([args.group] if args.group else []):
        spec.group(name)  # unknown group names fail before any work
    ctx = attack_steps.Context(spec, group=args.group, seed=args.seed,
                          truth={g.name: torch.arange(g.size) for g in spec.groups})
    sd, steps = attack_steps.run_pipeline(ref, values, ctx)
    truth = ctx.truth

    record = {**values, "group": args.group, "seed": args.seed}
    common.save_model(sd, args.output, folder, metadata={"findlady.attack": json.dumps(record)}, report=bars)
    if args.truth:
        write_truth(args.truth, {k: v for k, v in truth.items() if k not in ctx.origins}, origins=ctx.origins)
    if args.json:
        moved = {k: int((v != torch.arange(v.numel())).sum()) for k, v in truth.items()}
        emit_json({"output": args.output, "truth": args.truth, "steps": steps, "attack": record, "moved": moved})
    else:
        print(f"wrote {args.output}: " + "; ".join(steps))
        if args.truth:
            print(f"wrote {args.truth}: recovering permutations of {len(truth)} groups")
    return 0


# ---------------------------------------------------------------- resync


def cmd_resync(args: argparse.Namespace) -> int:
    from findlady_cli.truth import load_truth
    from findlady_core.errors import InputError
    from findlady_core.permute import psi
    from findlady_core.progress import tick
    from findlady_core.resync import resync

    if args.output and (common.same_file(args.output, args.reference) or common.same_file(args.output, args.suspect)):
        raise InputError("-o would overwrite an input; choose another file")
    bars = common.bars(args)
    t0 = time.perf_counter()
    (ref, _), (sus, folder) = common.load_models([args.reference, args.suspect], bars)  # output as the suspect was
    common.check_model_output(args.output, folder)
    spec = common.load_spec(args.spec, ref)
    truth = load_truth(args.truth, spec) if args.truth else None
    t1 = time.perf_counter()
    result = resync(ref, sus, spec, method=args.method, device=args.device, progress=bars)
    t2 = time.perf_counter()
    if args.output:
        if folder is not None or args.output.endswith(".pt"):
            common.save_model(result.state_dict, args.output, folder, report=bars)
        else:  # tensor by tensor, in the suspect's dtypes: the model is never held twice
            tick(bars, "write", 0, 1)
            result.state_dict.save(args.output)
            tick(bars, "write", 1, 1)
    timings = {"load": t1 - t0, "resync": t2 - t1, "write": time.perf_counter() - t2}
    psi_doc = None
    if truth is not None:
        per, total = psi(spec, truth, result.permutations)
        psi_doc = {"model": total, "groups": per}
    if args.json:
        emit_json({"resync": result.to_dict(), "psi": psi_doc, "output": args.output, "timings": timings})
        return 0
    rows = []
    for g in result.groups:
        row = [g.name, g.size, g.moved, g.mean_similarity, g.min_margin, g.ambiguous]
        if psi_doc is not None:
            row.append(psi_doc["groups"].get(g.name, "-"))
        rows.append(row)
    header = ["group", "size", "moved", "similarity", "min margin", "ambiguous"] + (["Psi %"] if psi_doc else [])
    table(rows, header)
    print(f"moved {result.moved} of {spec.neurons} neurons in {len(result.groups)} groups; "
          f"log10 p-value {result.log10_p_value:.1f}; {result.method} on {result.device}, {result.seconds:.2f} s")
    if psi_doc is not None:
        print(f"Psi {psi_doc['model']:.2f} %")
    if args.output:
        print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    from findlady_core.report import verify
    from findlady_core.watermark import load_key

    start = time.perf_counter()
    bars = common.bars(args)
    (ref, _), (sus, _) = common.load_models([args.reference, args.suspect], bars)
    spec = common.load_spec(args.spec, ref)
    key = load_key(args.key) if args.key else None
    info = (common.file_info(args.reference), common.file_info(args.suspect))
    options = {k: getattr(args, k) for k in ("alpha", "tolerance", "null_margin") if getattr(args, k) is not None}
    if args.undo_rotation:
        from findlady_core.rotation import family_from_config, load_config

        options["rotation"] = family_from_config(load_config(args.undo_rotation), ref.keys())
    report = verify(ref, sus, spec, key=key, device=args.device, reference_info=info[0], suspect_info=info[1],
                    progress=bars, load_seconds=time.perf_counter() - start, **options)
    if args.json:
        emit_json(report)
    else:
        print_report(report)
    return 0 if report.get("verdict") in POSITIVE_VERDICTS else 1


def print_report(report: Mapping[str, Any]) -> None:
    print(f"verdict: {report.get('verdict')}")
    for r in report.get("reasons") or []:
        print(f"  - {r}")
    rs = report.get("resync") or {}
    groups = rs.get("groups") or []
    if groups:
        table([(g.get("name"), g.get("size"), g.get("moved"), g.get("mean_similarity"), g.get("min_margin"), g.get("ambiguous"))
               for g in groups[:30]], ("group", "size", "moved", "similarity", "min margin", "ambiguous"))
        if len(groups) > 30:
            print(f"... and {len(groups) - 30} more groups")
    integ = report.get("integrity") or {}
    if integ:
        flagged = integ.get("flagged") or []
        count = integ.get("flagged_count", len(flagged))
        print(f"integrity: {integ.get('status')} ({count} neurons flagged, tolerance {integ.get('tolerance')})")
        for f in flagged[:10]:
            print(f"  {f.get('group')}[{f.get('neuron')}]: norm ratio {fmt(f.get('norm_ratio'))}, cosine {fmt(f.get('cosine'))}")
        if count > 10:
            print(f"  ... and {count - 10} more")
    wm = report.get("watermark")
    if wm:
        print(f"watermark: {'detected' if wm.get('detected') else 'not detected'}, {wm.get('bit_errors')}/{wm.get('bits')} "
              f"bit errors, p-value {fmt(wm.get('p_value'))}")
