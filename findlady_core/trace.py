"""Trace a permutation spec from a ``torch.nn.Module``.

The module is traced with ``torch.fx`` and its shapes propagated on an example input; the walk
(``findlady_core.trace_graph``) gives every tensor a channel layout, op by op, through one rule
per op (``findlady_core.trace_rules``). Each union-find class of channel axes that touches
neither the network's input nor its output becomes one group. An op without a rule fails
loudly (``TraceError``) rather than producing a spec that silently breaks the model, and every
traced spec is self-checked by permuting every group at random and comparing the module's
outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

import findlady_core.trace_rules  # noqa: F401  (registers the rules)
from findlady_core.errors import TraceError
from findlady_core.permute import (
    apply_permutations,
    random_permutations,
)
from findlady_core.spec import Group, Member, Spec
from findlady_core.trace_graph import Walker, _Axes

TOLERANCE = 1e-5


def _as_tuple(example_input: Tensor | tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


class _eval_mode:
    """Put a module in eval mode for a while, then restore every submodule's own flag."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def _tied(module: nn.Module) -> dict[str, list[str]]:
    """Every parameter/buffer name that shares its tensor with another name -> all its names."""
    by_id: dict[int, list[str]] = {}
    for n, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(n)
    return {n: names for names in by_id.values() if len(names) > 1 for n in names}


def trace_spec(module: nn.Module, example_input: Tensor | tuple[Any, ...], *, check: bool = True, seed: int = 0) -> Spec:
    """The permutation spec of ``module``, traced with torch.fx on ``example_input``.

    Groups are union-find classes of channel axes that touch neither the input nor the output,
    named after their first producing layer and listed in graph order (groups of one channel
    are left out: nothing to permute). With ``check`` the spec is self-checked
    (``check_spec``). Raises ``TraceError`` on untraceable modules, unknown ops, shared layers
    and tied weights.
    """
    inputs = _as_tuple(example_input)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    with _eval_mode(module):  # trace the inference graph (no drop-connect, no batch statistics)
        try:  # a plain run first: its error is clearer than the same one from inside fx
            with torch.no_grad():
                module(*inputs)
        except Exception as e:
            raise TraceError(f"running {type(module).__name__} on the example input failed: {type(e).__name__}: {e}") from None
        try:
            gm = fx.symbolic_trace(module)
        except Exception as e:  # fx raises many kinds (TraceError from control flow, TypeError...)
            raise TraceError(f"torch.fx cannot trace {type(module).__name__}: {type(e).__name__}: {e}") from None
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
        except Exception as e:
            raise TraceError(f"running {type(module).__name__} on the example input failed: {type(e).__name__}: {e}") from None
    walker = Walker(gm, shapes)
    walker.run()
    spec = _assemble(walker.axes, type(module).__name__)
    tied = _tied(module)
    for t in sorted(spec.tensors):
        if t in tied:
            raise TraceError(f"tied weights: {' and '.join(tied[t])} are one tensor; a spec cannot permute them apart")
    if not spec.groups:
        raise TraceError(f"{type(module).__name__} has no permutable channels between its input and output")
    if check:
        check_spec(module, spec, example_input, seed=seed)
    return spec


def _assemble(axes: _Axes, module_name: str) -> Spec:
    classes: dict[int, list[int]] = {}
    for i in range(len(axes.parent)):
        classes.setdefault(axes.find(i), []).append(i)
    found = []
    for root, ids in classes.items():
        if axes.boundary[root] or axes.size[root] <= 1:
            continue
        producers = sorted(p for i in ids if (p := axes.producer[i]) is not None)
        members = sorted(
            (m for i in ids for m in axes.members[i]),
            key=lambda m: (0 if Member(m.tensor, m.axis, role=m.role).is_out else 1, m.order, m.seq),
        )
        if not producers or not members:
            continue
        order, name = producers[0]
        group = Group(name, axes.size[root], tuple(Member(m.tensor, m.axis, m.offset, m.block, m.role) for m in members))
        found.append((order, group))
    found.sort(key=lambda t: t[0])
    return Spec(tuple(g for _, g in found), {"source": "trace", "module": module_name})


def _outputs(module: nn.Module, inputs: tuple[Any, ...]) -> list[Tensor]:
    with _eval_mode(module), torch.no_grad():
        out = module(*inputs)
    flat: list[Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            flat.append(o.detach())
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(out)
    return flat


def relative_error(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest ``max|a-b| / max|a|`` over matching output tensors."""
    err = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.double(), y.double()
        scale = float(x.abs().max()) if x.numel() else 0.0
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        err = max(err, diff / max(scale, 1e-30))
    return err


def check_spec(
    module: nn.Module,
    spec: Spec,
    example_input: Tensor | tuple[Any, ...],
    *,
    seed: int = 0,
    tolerance: float = TOLERANCE,
    groups: list[str] | None = None,
) -> float:
    """Permute every group (or ``groups``) at random, load the result into a copy of ``module``
    and compare its outputs on ``example_input`` with the original's (eval mode).

    Returns the relative max error; raises ``TraceError`` naming the guilty groups when it
    exceeds ``tolerance``. This is the proof that a spec is function-preserving for the module.
    """
    inputs = _as_tuple(example_input)
    state = module.state_dict()
    spec.validate(state)
    reference = _outputs(module, inputs)

    def error(names: list[str] | None) -> float:
        perms = random_permutations(spec, names, seed=seed)
        twin = copy.deepcopy(module)
        twin.load_state_dict(apply_permutations(state, spec, perms), strict=True)
        return relative_error(reference, _outputs(twin, inputs))

    err = error(groups)
    if err > tolerance:
        bad = [g for g in (groups or spec.names) if error([g]) > tolerance]
        raise TraceError(
            f"traced spec is not function-preserving: relative max error {err:.3g} > {tolerance:g} "
            f"after permuting the groups; groups that break it alone: {', '.join(bad[:10]) or 'none (only together)'}"
        )
    return err


__all__ = ["trace_spec", "check_spec", "relative_error", "TOLERANCE"]
