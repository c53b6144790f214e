"""The ``findlady`` command line: core subcommands (DESIGN.md section 6).

::

    findlady spec infer (--module pkg.mod:factory --input-shape 1,3,32,32 | --weights W [--family bert]) -o SPEC
    findlady spec check SPEC WEIGHTS
    findlady attack REF -o SUS --spec SPEC [--permute all|GROUP...] [--noise O] [--quantize B] [--prune T]
                    [--scale K --neurons 3,17,40] [--group NAME] [--seed S] [--truth TRUTH.json]
    findlady resync REF SUS --spec SPEC [-o RESYNCED] [--device auto|cpu|cuda] [--method findlady|paper]
                    [--truth TRUTH.json] [--json]
    findlady verify REF SUS --spec SPEC [--key KEY] [--device ...] [--alpha A] [--tolerance T] [--json]
    findlady watermark embed --model mnist_cnn --layer conv2.weight [--bits 64] [--seed 0] -o MODEL --key-out KEY
    findlady watermark extract MODEL --key KEY [--alpha A] [--json]

Exit codes: 0 ok (verify: ``match``/``match_modified``; extract: detected), 1 negative result
(verify: ``no_match``/``inconclusive``; extract: not detected), 2 bad input (usage errors, any
``InputError``, unreadable or unwritable files), 3 internal error (a bug: traceback on stderr).
``--json`` (every subcommand) prints one JSON document alone on stdout; a failure then prints
``{"error": {"code": ..., "message": ...}}`` and exits 2 (3 for an internal error). Without
``--json`` a short summary table goes to stdout. Error messages, warnings and progress bars go
to stderr (bars only when stderr is a terminal; ``--quiet`` hides bars and warnings).

Extending the parser (``app/cli.py`` adds ``serve``, ``worker``, ``demo``, ``bench``)::

    parser = findlady_core.cli.build_parser()
    sub = findlady_core.cli.subparsers(parser)   # the same object as parser._subparsers_action
    p = sub.add_parser("serve", help="...", parents=[findlady_core.cli.common_options()])
    p.set_defaults(func=run_serve)               # run_serve(args: argparse.Namespace) -> int
    return findlady_core.cli.main(argv, parser=parser)

Every subcommand stores its handler as ``func``; ``main`` dispatches to it and turns errors
into exit codes. Sub-parsers are created with the parser's class, whose usage errors can be
reported as JSON.

Only ``spec infer --module`` imports and runs code, the user's own module (the current
directory is put on ``sys.path`` first, as ``python -m`` does); weight, spec, truth and key files
are read as data only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import secrets
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from findlady_core.errors import InputError

TRUTH_FORMAT = "findlady.truth/1"
MAX_TRUTH_BYTES = 256 * 1024 * 1024  # a truth file holds one int per neuron: generous
DEVICES = ("auto", "cpu", "cuda")

Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- parser plumbing


class UsageExit(SystemExit):
    """A usage error: argparse's message was already printed on stderr; exit status 2.

    A ``SystemExit`` so that code calling ``parse_args`` directly behaves as with argparse.
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise ``UsageExit`` (carrying the message), so
    ``main`` can also report them as JSON."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        print(text, file=sys.stderr)
        raise UsageExit(text)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep hand-wrapped descriptions; show defaults that say something (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is not None and d is not False and d != argparse.SUPPRESS and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (``--json``, ``--quiet``); pass as ``parents=[...]``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print one JSON document alone on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings on stderr")
    return p


def subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The top-level subcommand registry of a parser made by ``build_parser``."""
    return parser._subparsers_action  # type: ignore[attr-defined,no-any-return]


def _int_list(text: str) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def _shape(text: str) -> list[int]:
    out = _int_list(text)
    if any(d <= 0 for d in out) or math.prod(out) > 1 << 28:
        raise argparse.ArgumentTypeError(f"a shape needs positive sizes of at most 2**28 elements, got {text!r}")
    return out


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _nonneg(text: str) -> float:
    v = _finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _fraction(text: str) -> float:
    v = _finite(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return v


def _probability(text: str) -> float:
    v = _finite(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1), got {text!r}")
    return v


def _bits(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= v <= 32:
        raise argparse.ArgumentTypeError(f"expected bits in [1, 32], got {v}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``findlady`` parser with the core subcommands; ``subparsers(parser)`` (equally
    ``parser._subparsers_action``) lets a caller add more. Handlers are stored as ``func``."""
    common = common_options()
    parser = Parser(
        prog="findlady",
        description="FindLady: re-synchronize permuted neural networks, check their integrity and "
        "read their white-box watermark (Find the Lady, AAAI 2024).",
        epilog="Exit codes: 0 ok, 1 negative verdict, 2 bad input, 3 internal error. "
        "Run 'findlady COMMAND --help' for each command.",
    )
    from findlady_core import __version__

    parser.add_argument("--version", action="version", version=f"findlady {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser._subparsers_action = sub  # type: ignore[attr-defined]

    def add(registry: argparse._SubParsersAction, name: str, summary: str, description: str, func: Handler) -> argparse.ArgumentParser:
        p = registry.add_parser(name, help=summary, description=description, parents=[common], formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    # spec
    spec_p = sub.add_parser("spec", help="make or check a permutation spec (findlady.spec/1)",
                            description="Permutation specs say which tensor axes share one permutation.")
    spec_sub = spec_p.add_subparsers(dest="spec_command", metavar="ACTION", required=True)
    p = add(spec_sub, "infer", "write the spec of a model (traced from its module, or guessed from its weights)",
            "Trace the spec of a torch.nn.Module (best: residual connections and flattens are found\n"
            "exactly and the spec is self-checked by permuting every group and comparing outputs),\n"
            "or infer it from a weight file: the built-in catalog for known families (BERT), else a\n"
            "plain chain of layers guessed from names and shapes (a warning: wrong for branching\n"
            "models). --module imports and runs your code; weight files are only read as data.",
            cmd_spec_infer)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--module", metavar="PKG.MOD:FACTORY",
                     help="import PKG.MOD (the current directory is on sys.path) and call FACTORY() for the nn.Module")
    src.add_argument("--weights", metavar="W", help="weight file (safetensors or torch.save zip) to infer the spec from")
    p.add_argument("--input-shape", type=_shape, metavar="1,3,32,32",
                   help="shape of the example input for --module (batch first), filled with torch.randn")
    p.add_argument("--family", choices=("bert", "chain"), help="with --weights: force a catalog family (default: detect)")
    p.add_argument("-o", "--output", required=True, metavar="SPEC", help="where to write the spec JSON")

    p = add(spec_sub, "check", "validate a spec against a weight file",
            "Check that every tensor of the spec exists in the weights, is floating point and is\n"
            "long enough, and that no two groups overlap badly.", cmd_spec_check)
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("weights", metavar="WEIGHTS")

    # attack
    p = add(sub, "attack", "permute and perturb a model (make a test suspect)",
            "Make a suspect from a reference. Steps, in this order:\n"
            "  1. --scale K --neurons I,J,...: w -> (1+K) w on those neurons of --group; the indices\n"
            "     are REFERENCE indices (the scaling happens before the permutation);\n"
            "  2. --permute: random permutation of all groups or the named ones (function-preserving);\n"
            "  3. --noise OMEGA: Gaussian noise of std OMEGA*std(tensor);\n"
            "  4. --quantize B: uniform quantization to 2**B levels per tensor;\n"
            "  5. --prune T: zero the fraction T of smallest |w| per tensor.\n"
            "Steps 3-5 hit --group's own parameters when given, else every floating tensor of\n"
            "two or more dimensions. --truth writes the recovering permutation of every group.",
            cmd_attack)
    p.add_argument("reference", metavar="REF", help="reference weight file")
    p.add_argument("-o", "--output", required=True, metavar="SUS", help="where to write the suspect (.pt: torch.save, else safetensors)")
    p.add_argument("--spec", required=True, metavar="SPEC", help="permutation spec of the model")
    p.add_argument("--permute", nargs="+", action="extend", metavar="all|GROUP",
                   help="permute all groups ('all') or the named groups (give REF before this option)")
    p.add_argument("--noise", type=_nonneg, metavar="OMEGA", help="Gaussian noise level (relative to each tensor's std)")
    p.add_argument("--quantize", type=_bits, metavar="B", help="quantize to B bits")
    p.add_argument("--prune", type=_fraction, metavar="T", help="fraction of weights to prune by magnitude")
    p.add_argument("--scale", type=_finite, metavar="K", help="scale the --neurons of --group by 1+K")
    p.add_argument("--neurons", type=_int_list, metavar="I,J,...", help="reference indices of the neurons to scale")
    p.add_argument("--group", metavar="NAME", help="limit noise/quantize/prune to this group's own parameters; the group of --scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation and of the noise")
    p.add_argument("--truth", metavar="TRUTH.json", help="write the recovering permutations (findlady.truth/1)")

    # resync
    p = add(sub, "resync", "put a suspect's neurons back in the reference order",
            "Re-synchronize SUS to REF on every group of the spec (one bijection per group) and\n"
            "print, per group, how many neurons moved, the matched similarity and the margin to the\n"
            "best alternative. With --truth (from 'attack --truth') also print Psi, the success\n"
            "rate: 100 * share of neurons put back at their true place.", cmd_resync)
    p.add_argument("reference", metavar="REF", help="reference weight file")
    p.add_argument("suspect", metavar="SUS", help="suspect weight file")
    p.add_argument("--spec", required=True, metavar="SPEC", help="permutation spec of the model")
    p.add_argument("-o", "--output", metavar="RESYNCED", help="write the re-synchronized suspect here")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to compute (auto: CUDA when present)")
    p.add_argument("--method", choices=("findlady", "paper"), default="findlady",
                   help="findlady: whole model, assignment solver; paper: Algorithm 1 (greedy argmax, for comparison)")
    p.add_argument("--truth", metavar="TRUTH.json", help="true recovering permutations: print Psi")

    # verify
    p = add(sub, "verify", "full check of a suspect: resync, integrity, watermark, verdict",
            "Re-synchronize SUS to REF, check the integrity of every neuron, read the watermark\n"
            "(with --key) and print the verdict. Exit 0 for match / match_modified, 1 for\n"
            "no_match / inconclusive, 2 for bad input. --json prints the findlady.report/1 document.",
            cmd_verify)
    p.add_argument("reference", metavar="REF", help="reference weight file")
    p.add_argument("suspect", metavar="SUS", help="suspect weight file")
    p.add_argument("--spec", required=True, metavar="SPEC", help="permutation spec of the model")
    p.add_argument("--key", metavar="KEY", help="watermark key of the reference (safetensors, DESIGN.md section 4)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to compute (auto: CUDA when present)")
    p.add_argument("--alpha", type=_probability, help="watermark p-value threshold (default: the report's, 1e-6)")
    p.add_argument("--tolerance", type=_nonneg,
                   help="integrity tolerance on a neuron's norm ratio and cosine (default: the report's)")

    # watermark
    wm = sub.add_parser("watermark", help="embed or extract a white-box (Uchida) watermark",
                        description="Uchida et al. 2017 watermark: a secret projection of the mean weight of one layer.")
    wm_sub = wm.add_subparsers(dest="watermark_command", metavar="ACTION", required=True)
    from findlady_core import models, train

    p = add(wm_sub, "embed", "train a bundled example model with a watermark",
            "Generate a secret key for LAYER and train the bundled example model with Uchida's\n"
            "regularizer. Writes the model's weights and the key (keep the key secret). Without\n"
            "--key-seed the key comes from the operating system's random source.", cmd_watermark_embed)
    p.add_argument("--model", required=True, choices=sorted(models.MODELS), help="bundled example model")
    p.add_argument("--layer", required=True, help="weight tensor to watermark, e.g. conv2.weight")
    p.add_argument("--bits", type=_positive_int, default=64, help="key length T")
    p.add_argument("--seed", type=int, default=0, help="training seed (initialisation and batch order)")
    p.add_argument("--key-seed", type=int, help="seed of the key (reproducible, hence guessable: tests only)")
    p.add_argument("--strength", type=_nonneg, default=train.WATERMARK_STRENGTH, help="regularizer weight lambda")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="where to write the trained weights")
    p.add_argument("--key-out", required=True, metavar="KEY", help="where to write the key (safetensors)")

    p = add(wm_sub, "extract", "read a watermark and decide whether it is there",
            "Read the key's bits from MODEL and count bit errors. Detected when the chance of so\n"
            "few errors from an unrelated model, P[Binomial(T, 1/2) <= errors], is below --alpha.\n"
            "A permutation of the layer's input channels destroys the read-out: resync first, or\n"
            "use 'findlady verify'. Exit 0 detected, 1 not detected.", cmd_watermark_extract)
    p.add_argument("model", metavar="MODEL", help="weight file")
    p.add_argument("--key", required=True, metavar="KEY", help="watermark key (safetensors)")
    p.add_argument("--alpha", type=_probability, default=1e-6, help="p-value threshold")
    return parser


# ---------------------------------------------------------------- helpers


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only where a person watches (stderr is a terminal) and not --quiet."""
    return not args.quiet and sys.stderr.isatty()


def _emit_json(doc: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(doc, indent=1, default=_json_default, allow_nan=False) + "\n")
    out.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _warn(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"warning: {message}", file=sys.stderr)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO | None = None) -> None:
    """A left-aligned plain-text table."""
    out = out or sys.stdout
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        out.write("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if v != int(v) else f"{v:.1f}"
    return str(v)


def _same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _check_output(*paths: str | None) -> None:
    """Fail before the work, not after it, when an output cannot be written."""
    for p in paths:
        if p is None:
            continue
        folder = Path(p).resolve().parent
        if not folder.is_dir():
            raise InputError(f"cannot write {p}: the folder {folder} does not exist")
        if Path(p).is_dir():
            raise InputError(f"cannot write {p}: it is a folder")
        if not os.access(folder, os.W_OK):
            raise InputError(f"cannot write {p}: the folder {folder} is not writable")


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    from findlady_core.io import load_state_dict

    return load_state_dict(path)


def _load_spec(path: str, state_dict: Mapping[str, torch.Tensor] | None = None) -> Any:
    from findlady_core.spec import Spec

    spec = Spec.load(path)
    if state_dict is not None:
        spec.validate(state_dict)
    return spec


def _file_info(path: str) -> dict[str, Any]:
    from findlady_core.io import state_dict_sha256

    return {"id": path, "sha256": state_dict_sha256(path)}


def write_truth(path: str | Path, truth: Mapping[str, torch.Tensor]) -> None:
    """Write ``{"format": "findlady.truth/1", "groups": {name: p}}`` (``p`` recovers, DESIGN section 2)."""
    doc = {"format": TRUTH_FORMAT, "groups": {k: [int(i) for i in torch.as_tensor(v).tolist()] for k, v in truth.items()}}
    Path(path).write_text(json.dumps(doc) + "\n")


def load_truth(path: str | Path, spec: Any) -> dict[str, torch.Tensor]:
    """Read a truth file and check each entry is a permutation of its spec group's size."""
    from findlady_core.permute import as_perm

    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_TRUTH_BYTES:
            raise InputError(f"truth file {p.name} has {size} bytes, more than {MAX_TRUTH_BYTES}")
        data = json.loads(p.read_bytes())
    except OSError as e:
        raise InputError(f"cannot read truth file {p.name}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"truth file {p.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != TRUTH_FORMAT or not isinstance(data.get("groups"), dict):
        raise InputError(f"truth file {p.name} must be a {TRUTH_FORMAT!r} object with a 'groups' mapping")
    out: dict[str, torch.Tensor] = {}
    for name, perm in data["groups"].items():
        g = spec.group(name)  # SpecError naming the unknown group
        if not isinstance(perm, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in perm):
            raise InputError(f"truth file {p.name}: group {name!r} must be a list of integers")
        out[name] = as_perm(perm, g.size, name)
    return out


# ---------------------------------------------------------------- spec


def _import_factory(target: str) -> Callable[[], Any]:
    """``pkg.mod:factory`` (``factory`` may be dotted: ``Class.method``) -> the callable."""
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
    from findlady_core.spec import Spec

    caught: list[str] = []
    _check_output(args.output)
    if args.module:
        if args.family:
            raise InputError("--family goes with --weights, not --module")
        if not args.input_shape:
            raise InputError("--module needs --input-shape, e.g. --input-shape 1,3,32,32")
        from findlady_core.trace import trace_spec

        factory = _import_factory(args.module)
        try:
            module = factory()
        except Exception as e:  # the user's code: report its failure as bad input, with its message
            raise InputError(f"{args.module}() failed: {type(e).__name__}: {e}") from None
        if not isinstance(module, torch.nn.Module):
            raise InputError(f"{args.module}() returned {type(module).__name__}, not a torch.nn.Module")
        example = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
        spec: Spec = trace_spec(module, example)
        source = "traced, self-checked"
    else:
        if args.input_shape:
            raise InputError("--input-shape goes with --module, not --weights")
        from findlady_core.infer import infer_spec

        sd = _load_weights(args.weights)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            spec = infer_spec(sd, family=args.family)
        caught = [str(x.message) for x in w if issubclass(x.category, UserWarning)]
        for msg in caught:
            _warn(args, msg)
        meta = dict(spec.meta or {})
        source = str(meta.get("source") or (f"catalog {meta['family']}" if meta.get("family") else "inferred"))
    spec.save(args.output)
    if args.json:
        _emit_json({"spec": args.output, "source": source, "groups": len(spec.groups),
                    "neurons": spec.neurons, "warnings": caught,
                    "group_sizes": {g.name: g.size for g in spec.groups}})
    else:
        print(f"wrote {args.output}: {len(spec.groups)} groups, {spec.neurons} neurons ({source})")
        _print_groups(spec)
    return 0


def _print_groups(spec: Any, limit: int = 30) -> None:
    rows = [(g.name, g.size, len(g.members)) for g in spec.groups[:limit]]
    _table(rows, ("group", "size", "members"))
    if len(spec.groups) > limit:
        print(f"... and {len(spec.groups) - limit} more groups")


def cmd_spec_check(args: argparse.Namespace) -> int:
    sd = _load_weights(args.weights)
    spec = _load_spec(args.spec, sd)
    if args.json:
        _emit_json({"valid": True, "groups": len(spec.groups), "neurons": spec.neurons})
    else:
        print(f"{args.spec} fits {args.weights}: {len(spec.groups)} groups, {spec.neurons} neurons")
    return 0


# ---------------------------------------------------------------- attack


def cmd_attack(args: argparse.Namespace) -> int:
    from findlady_core import attacks
    from findlady_core.io import save_state_dict

    if args.permute is None and args.noise is None and args.quantize is None and args.prune is None and args.scale is None:
        raise InputError("nothing to do: give at least one of --permute, --noise, --quantize, --prune, --scale")
    if (args.scale is None) != (args.neurons is None):
        raise InputError("--scale and --neurons go together")
    if args.scale is not None and args.group is None:
        raise InputError("--scale needs --group (the group whose --neurons are scaled)")
    if _same_file(args.output, args.reference):
        raise InputError("the output would overwrite the reference; choose another -o")
    if args.truth and (_same_file(args.truth, args.reference) or _same_file(args.truth, args.output)):
        raise InputError("--truth must be a file of its own")
    _check_output(args.output, args.truth)
    groups: list[str] | None = None
    if args.permute is not None:
        if "all" in args.permute:
            if len(args.permute) > 1:
                raise InputError("--permute takes 'all' or group names, not both")
        else:
            groups = list(dict.fromkeys(args.permute))

    ref = _load_weights(args.reference)
    spec = _load_spec(args.spec, ref)
    if groups is not None:
        for name in groups:
            spec.group(name)
    if args.group is not None:
        spec.group(args.group)

    sd: dict[str, torch.Tensor] = dict(ref)
    steps: list[str] = []
    if args.scale is not None:
        sd = attacks.scale_neurons(sd, spec, args.group, args.neurons, args.scale)
        steps.append(f"scaled {len(args.neurons)} neurons of {args.group} by 1{args.scale:+g}")
    truth: dict[str, torch.Tensor] = {g.name: torch.arange(g.size) for g in spec.groups}
    if args.permute is not None:
        pa = attacks.permute(sd, spec, groups, seed=args.seed)
        sd, truth = pa.state_dict, pa.truth
        n = len(spec.groups) if groups is None else len(groups)
        steps.append(f"permuted {n} group(s)")
    if args.noise is not None or args.quantize is not None or args.prune is not None:
        targets = attacks.attack_targets(sd, spec, args.group)
        where = f"group {args.group}" if args.group else f"{len(targets)} tensors"
        if args.noise is not None:
            sd = attacks.gaussian_noise(sd, args.noise, targets=targets, seed=args.seed)
            steps.append(f"noise omega={args.noise:g} on {where}")
        if args.quantize is not None:
            sd = attacks.quantize(sd, args.quantize, targets=targets)
            steps.append(f"quantized to {args.quantize} bits on {where}")
        if args.prune is not None:
            sd = attacks.prune(sd, args.prune, targets=targets)
            steps.append(f"pruned {args.prune:g} on {where}")

    record = {k: getattr(args, k) for k in ("permute", "noise", "quantize", "prune", "scale", "neurons", "group", "seed")}
    save_state_dict(sd, args.output, metadata={"findlady.attack": json.dumps(record)})
    if args.truth:
        write_truth(args.truth, truth)
    if args.json:
        moved = {k: int((v != torch.arange(v.numel())).sum()) for k, v in truth.items()}
        _emit_json({"output": args.output, "truth": args.truth, "steps": steps, "attack": record, "moved": moved})
    else:
        print(f"wrote {args.output}: " + "; ".join(steps))
        if args.truth:
            print(f"wrote {args.truth}: recovering permutations of {len(truth)} groups")
    return 0


# ---------------------------------------------------------------- resync


def cmd_resync(args: argparse.Namespace) -> int:
    from findlady_core.io import save_state_dict
    from findlady_core.permute import psi
    from findlady_core.resync import resync

    if args.output and (_same_file(args.output, args.reference) or _same_file(args.output, args.suspect)):
        raise InputError("-o would overwrite an input; choose another file")
    _check_output(args.output)
    ref = _load_weights(args.reference)
    sus = _load_weights(args.suspect)
    spec = _load_spec(args.spec, ref)
    truth = load_truth(args.truth, spec) if args.truth else None
    result = resync(ref, sus, spec, method=args.method, device=args.device, progress=_progress(args))
    if args.output:
        save_state_dict(result.state_dict, args.output)
    psi_doc = None
    if truth is not None:
        per, total = psi(spec, truth, result.permutations)
        psi_doc = {"model": total, "groups": per}
    if args.json:
        _emit_json({"resync": result.to_dict(), "psi": psi_doc, "output": args.output})
        return 0
    rows = []
    for g in result.groups:
        row = [g.name, g.size, g.moved, g.mean_similarity, g.min_margin, g.ambiguous]
        if psi_doc is not None:
            row.append(psi_doc["groups"].get(g.name, "-"))
        rows.append(row)
    header = ["group", "size", "moved", "similarity", "min margin", "ambiguous"] + (["Psi %"] if psi_doc else [])
    _table(rows, header)
    print(f"moved {result.moved} of {spec.neurons} neurons in {len(result.groups)} groups; "
          f"log10 p-value {result.log10_p_value:.1f}; {result.method} on {result.device}, {result.seconds:.2f} s")
    if psi_doc is not None:
        print(f"Psi {psi_doc['model']:.2f} %")
    if args.output:
        print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------- verify


POSITIVE_VERDICTS = ("match", "match_modified")


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        from findlady_core.report import verify
    except ImportError as e:  # pragma: no cover - only while the report module is missing
        raise RuntimeError(f"findlady_core.report is not available: {e}") from None
    from findlady_core.watermark import load_key

    start = time.perf_counter()
    ref = _load_weights(args.reference)
    sus = _load_weights(args.suspect)
    spec = _load_spec(args.spec, ref)
    key = load_key(args.key) if args.key else None
    info = (_file_info(args.reference), _file_info(args.suspect))
    options = {k: getattr(args, k) for k in ("alpha", "tolerance") if getattr(args, k) is not None}
    report = verify(ref, sus, spec, key=key, device=args.device, reference_info=info[0], suspect_info=info[1],
                    progress=_progress(args), load_seconds=time.perf_counter() - start, **options)
    verdict = report.get("verdict")
    if args.json:
        _emit_json(report)
    else:
        _print_report(report)
    return 0 if verdict in POSITIVE_VERDICTS else 1


def _print_report(report: Mapping[str, Any]) -> None:
    print(f"verdict: {report.get('verdict')}")
    for r in report.get("reasons") or []:
        print(f"  - {r}")
    rs = report.get("resync") or {}
    groups = rs.get("groups") or []
    if groups:
        _table([(g.get("name"), g.get("size"), g.get("moved"), g.get("mean_similarity"), g.get("min_margin"), g.get("ambiguous"))
                for g in groups[:30]], ("group", "size", "moved", "similarity", "min margin", "ambiguous"))
        if len(groups) > 30:
            print(f"... and {len(groups) - 30} more groups")
    integ = report.get("integrity") or {}
    if integ:
        flagged = integ.get("flagged") or []
        count = integ.get("flagged_count", len(flagged))
        print(f"integrity: {integ.get('status')} ({count} neurons flagged, tolerance {integ.get('tolerance')})")
        for f in flagged[:10]:
            print(f"  {f.get('group')}[{f.get('neuron')}]: norm ratio {_fmt(f.get('norm_ratio'))}, cosine {_fmt(f.get('cosine'))}")
        if count > 10:
            print(f"  ... and {count - 10} more")
    wm = report.get("watermark")
    if wm:
        print(f"watermark: {'detected' if wm.get('detected') else 'not detected'}, {wm.get('bit_errors')}/{wm.get('bits')} "
              f"bit errors, p-value {_fmt(wm.get('p_value'))}")


# ---------------------------------------------------------------- watermark


def cmd_watermark_embed(args: argparse.Namespace) -> int:
    from findlady_core import models, train
    from findlady_core.io import save_state_dict
    from findlady_core.watermark import detect, generate_key, save_key

    paths = [args.output, args.key_out]
    if _same_file(*paths):
        raise InputError("-o and --key-out must be different files")
    _check_output(*paths)
    shapes = models.build(args.model).state_dict()
    key_seed = args.key_seed if args.key_seed is not None else secrets.randbits(63)
    key = generate_key(args.layer, shapes, bits=args.bits, seed=key_seed)
    model, sd = train.trained(args.model, args.seed, watermark_key=key, watermark_strength=args.strength,
                              progress=_progress(args))
    accuracy = train.evaluate(model, train.held_out(args.model))
    wm = detect(sd, key)
    save_state_dict(sd, args.output, metadata={"findlady.model": args.model, "findlady.seed": str(args.seed)})
    save_key(key, args.key_out)
    if args.json:
        _emit_json({"model": args.output, "key": args.key_out, "layer": args.layer, "accuracy": accuracy, "watermark": wm})
    else:
        print(f"wrote {args.output} ({args.model}, seed {args.seed}, held-out accuracy {100 * accuracy:.2f} %)")
        print(f"wrote {args.key_out} ({key.T} bits on {args.layer}; keep it secret)")
        print(f"watermark read back: {wm['bit_errors']}/{wm['bits']} bit errors, p-value {_fmt(wm['p_value'])}")
    return 0


def cmd_watermark_extract(args: argparse.Namespace) -> int:
    from findlady_core.watermark import detect, load_key

    sd = _load_weights(args.model)
    key = load_key(args.key)
    wm = detect(sd, key, alpha=args.alpha)
    if args.json:
        _emit_json(wm)
    else:
        print(f"watermark {'detected' if wm['detected'] else 'not detected'} on {key.layer}: "
              f"{wm['bit_errors']}/{wm['bits']} bit errors, p-value {_fmt(wm['p_value'])} (alpha {args.alpha:g})")
    return 0 if wm["detected"] else 1


# ---------------------------------------------------------------- main


def _error(code: str, message: str, as_json: bool, status: int) -> int:
    if as_json:
        _emit_json({"error": {"code": code, "message": message}})
    print(f"findlady: error: {message}", file=sys.stderr)
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured stdout)
        pass


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return the exit status.

    ``parser`` defaults to ``build_parser()``; pass an extended one to add subcommands.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or build_parser()
    as_json = "--json" in argv
    try:
        args = parser.parse_args(argv)
    except UsageExit as e:
        if as_json:
            _emit_json({"error": {"code": "usage", "message": e.message}})
        return 2
    except SystemExit as e:  # --help, --version, or a parser class without UsageExit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    as_json = bool(getattr(args, "json", False))
    func: Handler | None = getattr(args, "func", None)
    if func is None:  # pragma: no cover - every leaf parser sets func
        parser.print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except InputError as e:
        return _error(getattr(e, "code", "bad_input"), str(e), as_json, 2)
    except BrokenPipeError:  # `findlady ... | head`: the reader left; not an error of ours
        _silence_stdout()
        return 141
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return _error("file_error", f"{e.strerror or e}{where}", as_json, 2)
    except KeyboardInterrupt:
        print("findlady: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: say so, keep the traceback, exit 3
        traceback.print_exc(file=sys.stderr)
        return _error("internal_error", f"{type(e).__name__}: {e}", as_json, 3)


if __name__ == "__main__":
    raise SystemExit(main())
