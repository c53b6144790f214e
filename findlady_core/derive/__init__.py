"""Permutation specs derived from an architecture: a transformers ``config.json`` in, a spec out.

The installed transformers class the config names is built on the meta device, traced with
``torch.export``, and every dimension of every value gets an axis id; one rule per aten op
joins, refines (head splits, slices) or pins them (``rules.py``). Each class of joined axes
that nothing pins becomes a group. An op or case without an exact rule pins what it touches
and says so in the spec's ``warnings``: a derived spec is never wrong, at worst incomplete.
Every derived spec is self-checked on a shrunk copy of the same class (``selfcheck.py``).

Public API: ``spec_from_config`` and ``spec_from_folder``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from findlady_core.derive import config as C
from findlady_core.derive.build import derive
from findlady_core.derive.names import stored_names
from findlady_core.derive.selfcheck import self_check as _self_check
from findlady_core.errors import SpecError
from findlady_core.spec import Spec

__all__ = ["spec_from_config", "spec_from_folder", "read_folder"]

Stored = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
MAX_CONFIG_BYTES = 1 << 20


def spec_from_config(config: Mapping[str, Any], stored: Stored | None = None, *, self_check: bool = True) -> Spec:
    """The exact permutation spec of the model ``config`` describes.

    ``stored`` maps the tensor names in the weight files to (shape, dtype); when given, the spec
    names those tensors and every spec tensor must be stored with the shape the config implies.
    Without it, the names ``save_pretrained`` would write are used. Logits and other task
    outputs never move; hidden-state outputs (``last_hidden_state``...) move with the residual
    group, as the spec says in ``warnings``. Raises ``SpecError`` on a config that is
    not valid data, a class that cannot be traced, or a failing self-check.
    """
    cfg, notes = C.validate_config(config)
    model, conf = C.build(cfg, device="meta")
    names = stored_names(model, None if stored is None else list(stored))
    derived = derive(model, C.example_inputs(model, conf), names, pin_outputs=False)
    if not derived.groups:
        raise SpecError(f"{type(model).__name__}: no permutation symmetry found (every axis is pinned)")
    shapes = {}
    for fqn, p in model.state_dict(keep_vars=True).items():
        for t in names.get(fqn, []):
            shapes[t] = (tuple(p.shape), p.dtype)
    if stored is not None:
        _check_stored(derived.groups, shapes, stored)
    warnings = notes + derived.warnings
    if derived.output_members:
        moved = ", ".join(sorted(derived.output_members)[:3])
        warnings.append(f"the model's outputs move with group(s) {moved}: compare them after undoing the permutation")
    meta: dict[str, Any] = {"family": cfg["model_type"], "architecture": type(model).__name__}
    if self_check:
        meta["self_check"] = _self_check(cfg, derived.groups)
    spec = Spec(tuple(derived.groups), meta, "config", tuple(warnings))
    spec.validate({t: torch.empty(s, dtype=d, device="meta") for t, (s, d) in shapes.items()})
    return spec


def _check_stored(groups: Any, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], stored: Stored) -> None:
    for g in groups:
        for m in g.members:
            if m.tensor not in stored:
                raise SpecError(f"tensor {m.tensor!r} of group {g.name!r} is not in the weight files")
            want, got = shapes[m.tensor][0], tuple(int(s) for s in stored[m.tensor][0])
            if want != got:
                raise SpecError(f"tensor {m.tensor!r}: the files hold shape {got} but the config implies {want}")


def read_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """``config.json`` and the names, shapes and dtypes in the folder's safetensors headers
    (one file or shards); no tensor data is read."""
    from findlady_core.io import read_safetensors_header

    folder = Path(path)
    cfg_path = folder / "config.json"
    try:
        raw = cfg_path.read_bytes()
    except OSError as e:
        raise SpecError(f"{folder}: cannot read config.json: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise SpecError(f"{cfg_path}: {len(raw)} bytes, more than {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SpecError(f"{cfg_path}: not valid JSON: {str(e)[:200]}") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SpecError(f"{folder}: no .safetensors weight files")
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for f in files:
        for name, (dtype, shape) in read_safetensors_header(f).items():
            if name in stored:
                raise SpecError(f"{folder}: tensor {name!r} is stored in two files")
            stored[name] = (tuple(shape), dtype)
    return config, stored


def spec_from_folder(path: str | Path, *, self_check: bool = True) -> Spec:
    """The spec of a Hugging Face model folder, from its config and its tensor names."""
    config, stored = read_folder(path)
    return spec_from_config(config, stored, self_check=self_check)
