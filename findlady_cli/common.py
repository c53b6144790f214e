"""What every command shares: value parsers for flags, output helpers and safe file access.

Only the standard library at import time: torch and the core load inside the functions, so
building the parser (``findlady --help``) stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

DEVICES = ("auto", "cpu", "cuda")

# ---------------------------------------------------------------- value parsers (argparse types)


def int_list(text: str) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def shape(text: str) -> list[int]:
    out = int_list(text)
    if any(d <= 0 for d in out) or math.prod(out) > 1 << 28:
        raise argparse.ArgumentTypeError(f"a shape needs positive sizes of at most 2**28 elements, got {text!r}")
    return out


def finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def nonneg(text: str) -> float:
    v = finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def fraction(text: str) -> float:
    v = finite(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return v


def probability(text: str) -> float:
    v = finite(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1), got {text!r}")
    return v


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def bits(text: str) -> int:
    v = integer(text)
    if not 1 <= v <= 32:
        raise argparse.ArgumentTypeError(f"expected bits in [1, 32], got {v}")
    return v


def positive_int(text: str) -> int:
    v = integer(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def split_fraction(text: str) -> float:
    v = finite(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return v


def dummies(text: str) -> int:
    v = positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 dummy neurons (their outgoing weights cancel), got {v}")
    return v


def head_map_kind(text: str) -> str:
    if text not in ("orthogonal", "general"):
        raise argparse.ArgumentTypeError(f"expected orthogonal or general, got {text!r}")
    return text


# The parsers an attack's ``Option.type`` may name (findlady_core.attack_steps.REGISTRY); "flag" is
# an option without a value.
VALUE_TYPES = {"path": str, "finite": finite, "nonneg": nonneg, "fraction": fraction, "bits": bits, "int_list": int_list,
               "split_fraction": split_fraction, "dummies": dummies, "head_map_kind": head_map_kind}


# ---------------------------------------------------------------- output


def progress(args: argparse.Namespace) -> bool:
    """Progress bars only where a person watches (stderr is a terminal) and not --quiet."""
    return not args.quiet and sys.stderr.isatty()


def bars(args: argparse.Namespace) -> Any:
    """The core's progress callback for this command: a tqdm bar per phase on stderr where a
    person watches (``progress``), else None. stdout is never touched."""
    if not progress(args):
        return None
    from findlady_core.progress import TqdmProgress

    return TqdmProgress()


def emit_json(doc: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(doc, indent=1, default=_json_default, allow_nan=False) + "\n")
    out.flush()


def _json_default(o: Any) -> Any:
    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def warn(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"warning: {message}", file=sys.stderr)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO | None = None) -> None:
    """A left-aligned plain-text table."""
    out = out or sys.stdout
    cells = [[str(h) for h in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        out.write("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() + "\n")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if v != int(v) else f"{v:.1f}"
    return str(v)


# ---------------------------------------------------------------- files


def same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def check_output(*paths: str | None) -> None:
    """Fail before the work, not after it, when an output cannot be written."""
    from findlady_core.errors import InputError

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


def load_weights(path: str) -> dict[str, Any]:
    """A weight file or a model folder (config.json + model.safetensors, or shards + index)."""
    from findlady_core.io import load_state_dict

    # memory-mapped: a multi-GB model is read on demand from the page cache, never copied whole
    return load_state_dict(path, mmap=True)


def load_model(path: str) -> tuple[dict[str, Any], Any]:
    """``(state_dict, folder)``: ``folder`` is the loaded ``findlady_core.folders.Folder`` (its
    config and layout) when ``path`` is a model folder, else None."""
    from findlady_core.folders import is_folder, load_folder

    if is_folder(path):
        folder = load_folder(path)
        return folder.state_dict, folder
    return load_weights(path), None


def check_model_output(path: str | None, like: Any) -> None:
    """``check_output`` for a model written like its input: a folder (``like`` is one) must be
    a new path or an empty folder, a file as ``check_output`` says."""
    from findlady_core.errors import InputError

    if path is None:
        return
    if like is None:
        check_output(path)
        return
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise InputError(f"cannot write the folder {path}: it exists and is not an empty folder")
    parent = p.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: the folder {parent} does not exist or is not writable")


def save_model(state_dict: Mapping[str, Any], path: str, like: Any, metadata: dict[str, str] | None = None,
               report: Any = None) -> None:
    """Write a model as its input was: a folder laid out like ``like`` (same shards, names,
    dtypes, config), or a single file when ``like`` is None; reported as phase ``write``."""
    from findlady_core.io import save_state_dict
    from findlady_core.progress import tick

    tick(report, "write", 0, 1)
    save_state_dict(state_dict, path, metadata=metadata, like=like)
    tick(report, "write", 1, 1)


def load_models(paths: Sequence[str], report: Any = None) -> list[tuple[dict[str, Any], Any]]:
    """``load_model`` for each path in order, reporting phase ``load`` in bytes read (files
    differ in size)."""
    from findlady_core.progress import tick

    sizes = [_size(p) for p in paths]
    total, done = sum(sizes), 0
    tick(report, "load", 0, total)
    out = []
    for path, size in zip(paths, sizes, strict=True):
        out.append(load_model(path))
        done += size
        tick(report, "load", done, total)
    return out


def _size(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def load_spec(path: str, state_dict: Mapping[str, Any] | None = None) -> Any:
    from findlady_core.spec import Spec

    spec = Spec.load(path)
    if state_dict is not None:
        spec.validate(state_dict)
    return spec


def file_info(path: str) -> dict[str, Any]:
    from findlady_core.io import file_sha256

    return {"id": path, "sha256": file_sha256(path)}
