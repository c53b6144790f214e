"""Function-preserving rescales of neurons, found and undone (used by ``findlady_core.integrity``).

A ReLU neuron's own parameters times ``c > 0`` and its consumers' input weights (``role: in``)
times ``1 / c`` compute the same function, yet move norms and the watermark read-out. Factors of
neighbouring layers are estimated jointly by Gauss-Seidel sweeps (``_find_rescales``); only
neurons explained on both sides within the tolerances keep one; ``undo_rescale`` divides them
out. Per-neuron sums over a vector split across members are ``_Pairs``.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from findlady_core.errors import InputError
from findlady_core.permute import member_rows
from findlady_core.spec import Group, Member, Spec, is_statistic

_TINY = 1e-300  # keeps logs of all-zero (fully pruned) neurons finite


def _rows(t: torch.Tensor, m: Member, size: int) -> torch.Tensor:
    """``member_rows`` in float32 at least; sums over a neuron are float64 (``_Pairs.add``), so
    a 1% change is never lost, at half the memory traffic of float64 copies of the rows."""
    x = member_rows(t.detach(), m, size)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


Sums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _sums(r: torch.Tensor, s: torch.Tensor) -> Sums:
    """One member's per-neuron <s, r>, ||r||^2, ||s||^2 (float64)."""
    if r.dtype != s.dtype:
        r, s = r.to(torch.float64), s.to(torch.float64)
    # products and each row's sum in the rows' dtype, the sums then float64 (for the ratios
    # and cosines taken from them, and sums over members): torch sums float32 rows by cascade
    # summation, relative error about 1e-7 on 3072 terms, 500x below the cosine tolerance's
    # 5e-5; a float64 sum of float32 rows (``sum(dtype=float64)``) takes 2-3x longer
    return (r * s).sum(1).double(), r.square().sum(1).double(), s.square().sum(1).double()


@dataclass
class _Pairs:
    """Per-neuron sums over a vector split across members: <s, r>, ||r||^2, ||s||^2."""

    dot: torch.Tensor
    rr: torch.Tensor
    ss: torch.Tensor

    @classmethod
    def zeros(cls, n: int) -> _Pairs:
        z = torch.zeros(n, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    def add(self, r: torch.Tensor, s: torch.Tensor) -> None:
        self.add_sums(*_sums(r, s))

    def add_sums(self, dot: torch.Tensor, rr: torch.Tensor, ss: torch.Tensor) -> None:
        self.dot += dot
        self.rr += rr
        self.ss += ss

    @property
    def present(self) -> torch.Tensor:
        return (self.rr > 0) | (self.ss > 0)

    def log_ratio(self) -> torch.Tensor:
        """``log(||s|| / ||r||)``; 0 for two zero vectors, large but finite if one is zero."""
        lr = 0.5 * (torch.log(self.ss + _TINY) - torch.log(self.rr + _TINY))
        return torch.where(self.present, lr, torch.zeros_like(lr))

    def cosine(self) -> torch.Tensor:
        """1 for two zero vectors, 0 when exactly one is zero."""
        denom = torch.sqrt(self.rr * self.ss)
        cos = torch.where(denom > 0, self.dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
        return torch.where(self.present, cos, torch.ones_like(cos)).clamp(-1.0, 1.0)




class _Scales:
    """Log rescale factors per permuted group and the per-axis factor vectors they imply.

    A tensor element's expected factor is the product over its axes of ``c`` for an out member
    and ``1 / c`` for an in member, the rescales of every group touching that axis.
    """

    def __init__(self, spec: Spec, shapes: Mapping[str, torch.Size]):
        self.spec = spec
        self.shapes = shapes
        self.log: dict[str, torch.Tensor] = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in spec.groups}
        self.on_axis: dict[tuple[str, int], list[tuple[Group, Member]]] = {}
        # a member's sums against the suspect on unscaled reference rows: the same in every
        # sweep that applies no factor to it (an embedding table's vocabulary axis has none)
        # and in the check, so each is computed once
        self.plain: dict[tuple[str, int, int, int, int], Sums] = {}
        for g in spec.groups:
            for m in g.members:
                if not is_statistic(m.tensor):
                    self.on_axis.setdefault((m.tensor, m.axis), []).append((g, m))

    def axis_log(self, tensor: str, axis: int, exclude: str | None = None) -> torch.Tensor | None:
        """Log factor along one axis of ``tensor`` (None when it is all zeros)."""
        out = None
        for g, m in self.on_axis.get((tensor, axis), []):
            if g.name == exclude:
                continue
            lg = self.log[g.name]
            if not bool(lg.any()):
                continue
            if out is None:
                out = torch.zeros(self.shapes[tensor][axis], dtype=torch.float64)
            sign = 1.0 if m.is_out else -1.0
            out[m.offset : m.offset + g.size * m.block] += sign * lg.repeat_interleave(m.block)
        return out

    def tensor_factor(self, tensor: str, exclude: str | None = None) -> torch.Tensor | None:
        """The full factor tensor of ``tensor`` (broadcastable), or None when it is 1."""
        shape = self.shapes[tensor]
        total = None
        for a in range(len(shape)):
            v = self.axis_log(tensor, a, exclude)
            if v is None:
                continue
            view = [1] * len(shape)
            view[a] = shape[a]
            v = v.view(view)
            total = v if total is None else total + v
        return None if total is None else torch.exp(total)

    def plain_sums(self, ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], m: Member,
                   size: int) -> Sums:  # fmt: skip
        """``_sums`` of the member's unscaled reference rows and suspect rows, computed once
        per ``_Scales`` (which sees one suspect)."""
        key = (m.tensor, m.axis, m.offset, m.block, size)
        hit = self.plain.get(key)
        if hit is None:
            hit = self.plain[key] = _sums(_rows(ref[m.tensor], m, size), _rows(sus[m.tensor], m, size))
        return hit

    def scaled(self, m: Member, exclude: str | None) -> bool:
        """Whether any group but ``exclude`` applies a factor to member ``m``'s tensor."""
        shape = self.shapes[m.tensor]
        return any(g.name != exclude and bool(self.log[g.name].any())
                   for a in range(len(shape)) for g, _ in self.on_axis.get((m.tensor, a), []))

    def expected_rows(self, ref: Mapping[str, torch.Tensor], m: Member, size: int, exclude: str | None,
                      neurons: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Member ``m``'s rows of the reference (float64) with every group's rescale applied
        except ``exclude``'s. Only the member's slice is scaled, not the whole tensor: a
        tensor shared by many groups (a query matrix and its heads) is not converted each time."""
        rows = _rows(ref[m.tensor], m, size)
        if neurons is not None:  # only these neurons' rows
            rows = rows[neurons]
        shape = self.shapes[m.tensor]
        log = None
        parts = 0
        for a in range(len(shape)):
            v = self.axis_log(m.tensor, a, exclude)
            if v is None:
                continue
            if a == m.axis:  # (size, block, 1, ...): the member's own range
                part = v[m.offset : m.offset + size * m.block].view(size, m.block, *([1] * (len(shape) - 1)))
            else:  # (1, 1, ..., L_a, ...): this axis' place among the member's other axes
                others = [b for b in range(len(shape)) if b != m.axis]
                view = [1, 1] + [1] * len(others)
                view[2 + others.index(a)] = shape[a]
                part = v.view(view)
            log = part if log is None else log + part
            parts += 1
        if log is None:
            return rows
        if parts == 1:  # one axis' factors: exp of that vector, broadcast (the same numbers, one exp per entry of the axis)
            log = torch.exp(log).to(rows.dtype)
        full = log.expand(size, m.block, *[shape[b] for b in range(len(shape)) if b != m.axis])
        if neurons is not None:
            full = full[neurons]
        factor = full.reshape(rows.shape[0], -1)
        return rows * (factor if parts == 1 else torch.exp(factor).to(rows.dtype))


def _estimate(scales: _Scales, ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], g: Group) -> torch.Tensor:
    """Least-squares factor of each neuron from its own parameters, given the other groups'."""
    acc = _Pairs.zeros(g.size)
    for m in g.own_members:
        if scales.scaled(m, g.name):
            acc.add(scales.expected_rows(ref, m, g.size, g.name), _rows(sus[m.tensor], m, g.size))
        else:  # unscaled reference rows: the same sums as in any other sweep, computed once
            acc.add_sums(*scales.plain_sums(ref, sus, m, g.size))
    c = torch.where(acc.rr > 0, acc.dot / torch.where(acc.rr > 0, acc.rr, torch.ones_like(acc.rr)), torch.ones_like(acc.rr))
    # only c > 0 preserves a ReLU's function; anything else is not a rescale
    return torch.where(c > 0, torch.log(c.clamp_min(1e-300)), torch.zeros_like(c))


def _consistent(
    scales: _Scales, ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], g: Group, tol: float, ctol: float,
    only: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which neurons of ``g`` are explained by the current factors on both sides. With ``only``
    (a mask), just those neurons are checked (a neuron's answer depends on its own rows
    alone); the others read as explained."""
    lg = scales.log[g.name]
    ok = torch.ones(g.size, dtype=torch.bool)
    has = lg != 0 if only is None else (lg != 0) & only
    cand = torch.nonzero(has).flatten()  # only neurons with a factor need checking
    for side in ("out", "in"):
        members = g.own_members if side == "out" else [m for m in g.in_members if not is_statistic(m.tensor)]
        if not members:
            return torch.zeros(g.size, dtype=torch.bool)  # nobody compensates: not function-preserving
        if not cand.numel():
            continue
        every = cand.numel() == g.size  # (a perturbed suspect: every neuron has one) no copies of all rows
        acc = _Pairs.zeros(cand.numel())
        for m in members:
            s_rows = _rows(sus[m.tensor], m, g.size)
            acc.add(scales.expected_rows(ref, m, g.size, None, None if every else cand), s_rows if every else s_rows[cand])
        ok[cand] &= (acc.log_ratio().abs() <= tol) & (acc.cosine() >= 1 - ctol)
    return ok | ~has


def _find_rescales(
    ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], spec: Spec, tol: float, ctol: float,
    max_sweeps: int = 12,
) -> _Scales:
    """Joint factors of every permuted group; only neurons explained on both sides keep one."""
    scales = _Scales(spec, {k: v.shape for k, v in ref.items()})
    groups = [g for g in spec.groups if g.in_members and g.out_members]
    # Gauss-Seidel sweeps: in a chain each group's rows depend on its inputs' factors only.
    for sweep in range(max_sweeps):
        change = 0.0
        for g in groups:
            new = _estimate(scales, ref, sus, g)
            change = max(change, float((new - scales.log[g.name]).abs().max()))
            scales.log[g.name] = new
        if sweep == 0 and all(float(scales.log[g.name].abs().max()) <= tol for g in groups):
            break  # nothing looks rescaled: the common case, decided in one pass
        if change < 1e-10:
            break
        # (only neurons whose factor is beyond the tolerance count, so only they are checked)
        if sweep >= 1 and not any(
            bool((_consistent(scales, ref, sus, g, tol, ctol, only=big) & big).any())
            for g in groups for big in [scales.log[g.name].abs() > tol]
        ):
            break  # no factor explains any neuron (a suspect perturbed everywhere): stop early
    for g in groups:
        lg = scales.log[g.name]
        scales.log[g.name] = torch.where(lg.abs() > tol, lg, torch.zeros_like(lg))
    # Reject neurons a rescale does not explain, until every kept factor is consistent.
    for _ in range(len(groups) + 2):
        rejected = False
        for g in groups:
            lg = scales.log[g.name]
            if not bool(lg.any()):
                continue
            ok = _consistent(scales, ref, sus, g, tol, ctol)
            if not bool(ok.all()):
                scales.log[g.name] = torch.where(ok, lg, torch.zeros_like(lg))
                rejected = True
        if not rejected:
            break
    return scales


def undo_rescale(
    state_dict: Mapping[str, torch.Tensor], spec: Spec, rescaled: Iterable[Mapping[str, Any]]
) -> Mapping[str, torch.Tensor]:
    """Divide out function-preserving rescales: each listed neuron's own parameters by its
    ``factor`` and its consumers' input weights by ``1 / factor``. ``rescaled`` is
    ``IntegrityResult.rescaled`` (dicts with group, neuron, factor); running statistics stay."""
    scales = _Scales(spec, {k: v.shape for k, v in state_dict.items()})
    for r in rescaled:
        g = spec.group(str(r["group"]))
        i = int(r["neuron"])
        f = float(r["factor"])
        if not 0 <= i < g.size:
            raise InputError(f"rescaled neuron {i} is not in group {g.name!r} (size {g.size})")
        if not (f > 0 and math.isfinite(f)):
            raise InputError(f"rescale factor of group {g.name!r} neuron {i} must be positive, got {f}")
        scales.log[g.name][i] = math.log(f)
    return _apply_inverse(state_dict, scales)


def _apply_inverse(state_dict: Mapping[str, torch.Tensor], scales: _Scales) -> ChainMap[str, torch.Tensor]:
    out: ChainMap[str, torch.Tensor] = ChainMap({}, state_dict)  # changed tensors over the rest, unread
    for tensor in {t for (t, _a) in scales.on_axis}:
        f = scales.tensor_factor(tensor)
        if f is not None:
            t = state_dict[tensor]
            out[tensor] = (t.detach().to(torch.float64) / f).to(t.dtype)
    return out


def undo_found_rescales(reference: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], spec: Spec,
                        tolerance: float) -> Mapping[str, torch.Tensor]:  # fmt: skip
    """``state_dict`` with the rescales the joint estimate finds within ``tolerance`` (norm
    log-ratio and cosine drop, both sides) divided out; ``state_dict`` itself when none is found."""
    scales = _find_rescales(reference, state_dict, spec, tolerance, tolerance)
    if not any(bool(v.any()) for v in scales.log.values()):
        return state_dict
    return _apply_inverse(state_dict, scales)
