"""Does a suspect fit a reference? One check for the library, the CLI and the service.

Both sides may be state dicts or *shape dicts* ``{name: [shape list, dtype string]}`` (what
``shapes_of`` returns; the service stores one per reference). The suspect must hold exactly the
reference's tensors, with the same shapes, floating where the reference is floating: another
float precision is a legitimate (quantized) copy, integers for floats are not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from findlady_core.errors import InputError

Shapes = dict[str, list[Any]]  # name -> [list(shape), dtype without "torch."]


class IncompatibleError(InputError):
    """The suspect does not fit the reference; ``code`` says how (for HTTP 422 bodies)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def shapes_of(state_dict: Mapping[str, Any]) -> Shapes:
    """``{name: [list(shape), dtype]}``, the dtype without its ``torch.`` prefix."""
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state_dict.items()}


def _as_shapes(d: Mapping[str, Any]) -> Shapes:
    known = getattr(d, "shapes", None)  # a lazy state dict knows its shapes without reading tensors
    if callable(known):
        return known()  # type: ignore[no-any-return]
    if all(isinstance(v, (list, tuple)) for v in d.values()):
        return {k: [list(v[0]), str(v[1])] for k, v in d.items()}
    return shapes_of(d)


def is_float(dtype: str) -> bool:
    import torch

    t = getattr(torch, dtype, None)
    return isinstance(t, torch.dtype) and t.is_floating_point


def check_compatible(
    reference: Mapping[str, Any], suspect: Mapping[str, Any], *, names: Iterable[str] | None = None, spec: Any = None
) -> None:
    """Raise ``IncompatibleError`` (code ``shape_mismatch`` or ``dtype_mismatch``) naming the
    first tensor that does not fit. ``names`` limits the check to those tensors (and then extra
    suspect tensors are allowed): re-synchronization needs only the spec's. With ``spec``, a
    suspect may differ on the axes of the spec's width groups (split or dummy neurons, at most
    2x: ``findlady_core.canon.widths``); every other length must match."""
    ref, sus = _as_shapes(reference), _as_shapes(suspect)
    free: set[tuple[str, int]] = set()
    if spec is not None:
        from findlady_core.canon.widths import suspect_widths, width_axes

        free = width_axes(spec, ref)
        try:
            suspect_widths(spec, ref, {k: v for k, v in sus.items() if k in ref and len(v[0]) == len(ref[k][0])})
        except ValueError as e:
            raise IncompatibleError("shape_mismatch", f"suspect: {e}") from None
    wanted = sorted(ref) if names is None else sorted(names)
    for name in wanted:
        if name not in ref:
            raise IncompatibleError("shape_mismatch", f"reference: tensor {name!r} is missing")
        shape, dtype = ref[name]
        if name not in sus:
            raise IncompatibleError("shape_mismatch", f"suspect: tensor {name!r} of the reference is missing")
        if sus[name][0] != shape and not _only_free(name, shape, sus[name][0], free):
            raise IncompatibleError(
                "shape_mismatch", f"suspect: tensor {name!r} has shape {tuple(sus[name][0])}, the reference has {tuple(shape)}"
            )
        if is_float(sus[name][1]) != is_float(dtype):
            raise IncompatibleError(
                "dtype_mismatch", f"suspect: tensor {name!r} has dtype {sus[name][1]}, the reference has {dtype}"
            )
    if names is not None:
        return
    extra = sorted(set(sus) - set(ref))
    if extra:
        raise IncompatibleError(
            "shape_mismatch",
            f"suspect: tensor {extra[0]!r} is not in the reference" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
        )


def _only_free(name: str, ref: list[int], sus: list[int], free: set[tuple[str, int]]) -> bool:
    """Same rank, and every differing axis one a width group may change."""
    return len(ref) == len(sus) and all(a == b or (name, i) in free for i, (a, b) in enumerate(zip(ref, sus)))


__all__ = ["IncompatibleError", "Shapes", "check_compatible", "is_float", "shapes_of"]
