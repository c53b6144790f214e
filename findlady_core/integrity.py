"""Integrity of a re-synchronized suspect, neuron by neuron (paper section 3.4).

Re-synchronization matches neurons by cosine similarity, which is blind to the paper's
integrity attack ``w -> (1 + k) w``: the cosine stays 1 while the layer's output changes
(eq. 10-11). So every neuron's own parameters are compared with the reference on two counts:

* **norm**: ``norm_ratio = ||w_sus|| / ||w_ref||``, flagged when ``|log norm_ratio| > tolerance``
  (default 0.01: the neuron's norm is off by more than about 1%);
* **direction**: ``cosine(w_sus, w_ref)``, flagged when ``cosine < 1 - cos_tolerance``. The
  default ``cos_tolerance = tolerance**2 / 2`` is the cosine of a change of relative size
  ``tolerance`` orthogonal to ``w``, so a change of more than 1% of the neuron's norm is
  flagged whichever way it points: along ``w`` by the norm check, across it by the cosine.

A neuron's own parameters are its group's ``role: out`` slices (weight row, bias, norm
parameters). BatchNorm running statistics (activation estimates) are a second vector with the
same tolerances. Layers no group permutes are checked row by row under their module name.

**Function-preserving rescales**. A ReLU neuron's own parameters times ``c > 0`` and its
consumers' input weights (``role: in``) times ``1 / c`` compute the same function, yet move
norms and the watermark read-out: such neurons are reported as ``rescaled`` (not modified) and
``undo_rescale`` puts them back before the checks and the watermark. Both sides must agree
within the tolerances, so a one-sided change (the scaling attack) never passes. Factors of
neighbouring layers are estimated jointly (every neuron of every layer rescaled is recognised);
in a normalized layer the equivalent change is reported as a modification.
"""

from __future__ import annotations

import math
import time
from collections import ChainMap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from findlady_core.compat import check_compatible
from findlady_core.errors import InputError
from findlady_core.permute import member_rows
from findlady_core.progress import Progress, tick
from findlady_core.spec import Group, Member, Spec, is_statistic

DEFAULT_TOLERANCE = 0.01
REPORT_MAX_FLAGGED = 100
_TINY = 1e-300  # keeps logs of all-zero (fully pruned) neurons finite


def default_cos_tolerance(tolerance: float) -> float:
    """``tolerance**2 / 2``: the cosine drop of an orthogonal change of relative size ``tolerance``."""
    return tolerance * tolerance / 2


@dataclass
class IntegrityResult:
    """Outcome of ``check_integrity``.

    ``flagged`` holds every flagged neuron, most deviant first, as dicts ``{group, neuron,
    norm_ratio, cosine}`` (plus ``statistics_norm_ratio`` / ``statistics_cosine`` when the
    running statistics differ); ``rescaled`` holds ``{group, neuron, factor}``; ``state_dict``
    is the suspect with those rescales undone (what the watermark is read from).
    """

    status: str
    tolerance: float
    cos_tolerance: float
    flagged: list[dict[str, Any]]
    rescaled: list[dict[str, Any]]
    max_abs_log_norm_ratio: float
    min_cosine: float
    neurons: int
    groups: dict[str, dict[str, Any]]
    unpermuted_layers: list[str]
    seconds: float = 0.0
    state_dict: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def modified(self) -> bool:
        return self.status == "modified"

    def to_dict(self, max_flagged: int = REPORT_MAX_FLAGGED) -> dict[str, Any]:
        """The report's ``integrity`` block (``findlady_core.report``); long lists are capped at the
        ``max_flagged`` most deviant entries, with the full counts alongside."""
        return {
            "status": self.status,
            "tolerance": self.tolerance,
            "cos_tolerance": self.cos_tolerance,
            "rule": "flag a neuron when |log(norm_ratio)| > tolerance or cosine < 1 - cos_tolerance",
            "neurons": self.neurons,
            "flagged_count": len(self.flagged),
            "flagged": self.flagged[:max_flagged],
            "rescaled_count": len(self.rescaled),
            "rescaled": self.rescaled[:max_flagged],
            "max_abs_log_norm_ratio": self.max_abs_log_norm_ratio,
            "min_cosine": self.min_cosine,
            "groups": self.groups,
            "unpermuted_layers": self.unpermuted_layers,
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------------------------------------
# units: the spec's groups plus the layers no group permutes


def _units(spec: Spec, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[Group], list[str]]:
    """The spec's groups, then one pseudo-group per layer whose own rows no group covers.

    A pseudo-group gathers the floating tensors (1-D or more) of one module prefix with the
    same axis-0 length; its neurons are the rows (unpermuted, e.g. a classifier's outputs).
    """
    covered = {m.tensor for g in spec.groups for m in g.out_members}
    names = set(spec.names)
    layers: dict[tuple[str, int], list[str]] = {}
    for name, t in state_dict.items():
        if name in covered or not t.is_floating_point() or t.dim() == 0:
            continue
        prefix = name.rsplit(".", 1)[0] if "." in name else name
        layers.setdefault((prefix, int(t.shape[0])), []).append(name)
    extra = []
    for (prefix, rows), tensors in layers.items():
        label = prefix if prefix not in names else f"{prefix} (rows)"
        if any(prefix == p and r != rows for p, r in layers if (p, r) != (prefix, rows)):
            label = f"{label} [{rows}]"
        extra.append(Group(label, rows, tuple(Member(t, 0, role="out") for t in tensors)))
    return list(spec.groups) + extra, [g.name for g in extra]


def _rows(t: torch.Tensor, m: Member, size: int) -> torch.Tensor:
    """``member_rows`` in float32 at least; sums over a neuron are float64 (``_Pairs.add``), so
    a 1% change is never lost, at half the memory traffic of float64 copies of the rows."""
    x = member_rows(t.detach(), m, size)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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
        if r.dtype != s.dtype:
            r, s = r.to(torch.float64), s.to(torch.float64)
        # products in the rows' dtype (exact enough: float32 rounds one product by 6e-8),
        # sums in float64 (measured the fastest of the variants on strided rows)
        self.dot += (r * s).double().sum(1)
        self.rr += r.square().double().sum(1)
        self.ss += s.square().double().sum(1)

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


# ---------------------------------------------------------------------------------------------
# function-preserving rescales


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
        if log is None:
            return rows
        full = log.expand(size, m.block, *[shape[b] for b in range(len(shape)) if b != m.axis])
        if neurons is not None:
            full = full[neurons]
        return rows * torch.exp(full.reshape(rows.shape[0], -1)).to(rows.dtype)


def _estimate(scales: _Scales, ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], g: Group) -> torch.Tensor:
    """Least-squares factor of each neuron from its own parameters, given the other groups'."""
    acc = _Pairs.zeros(g.size)
    for m in g.own_members:
        acc.add(scales.expected_rows(ref, m, g.size, g.name), _rows(sus[m.tensor], m, g.size))
    c = torch.where(acc.rr > 0, acc.dot / torch.where(acc.rr > 0, acc.rr, torch.ones_like(acc.rr)), torch.ones_like(acc.rr))
    # only c > 0 preserves a ReLU's function; anything else is not a rescale
    return torch.where(c > 0, torch.log(c.clamp_min(1e-300)), torch.zeros_like(c))


def _consistent(
    scales: _Scales, ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], g: Group, tol: float, ctol: float
) -> torch.Tensor:
    """Which neurons of ``g`` are explained by the current factors on both sides."""
    lg = scales.log[g.name]
    ok = torch.ones(g.size, dtype=torch.bool)
    cand = torch.nonzero(lg != 0).flatten()  # only neurons with a factor need checking
    for side in ("out", "in"):
        members = g.own_members if side == "out" else [m for m in g.in_members if not is_statistic(m.tensor)]
        if not members:
            return torch.zeros(g.size, dtype=torch.bool)  # nobody compensates: not function-preserving
        if not cand.numel():
            continue
        acc = _Pairs.zeros(cand.numel())
        for m in members:
            acc.add(scales.expected_rows(ref, m, g.size, None, cand), _rows(sus[m.tensor], m, g.size)[cand])
        ok[cand] &= (acc.log_ratio().abs() <= tol) & (acc.cosine() >= 1 - ctol)
    return ok | (lg == 0)


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
        if sweep >= 1 and not any(
            bool((_consistent(scales, ref, sus, g, tol, ctol) & (scales.log[g.name].abs() > tol)).any()) for g in groups
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


# ---------------------------------------------------------------------------------------------
# the check


def _check_tolerances(tolerance: float, cos_tolerance: float | None) -> tuple[float, float]:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (0 < tolerance < 10):
        raise InputError(f"integrity tolerance must be a number in (0, 10), got {tolerance!r}")
    ctol = default_cos_tolerance(float(tolerance)) if cos_tolerance is None else cos_tolerance
    if isinstance(ctol, bool) or not isinstance(ctol, (int, float)) or not (0 < ctol <= 2):
        raise InputError(f"cosine tolerance must be a number in (0, 2], got {ctol!r}")
    return float(tolerance), float(ctol)


def check_integrity(
    reference: Mapping[str, torch.Tensor],
    resynced: Mapping[str, torch.Tensor],
    spec: Spec,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    cos_tolerance: float | None = None,
    detect_rescale: bool = True,
    progress: Progress | None = None,
) -> IntegrityResult:
    """Compare every neuron of the re-synchronized suspect with the reference.

    ``status`` is ``modified`` when any neuron is flagged (norm off by more than ``tolerance``
    in log terms, or cosine below ``1 - cos_tolerance``), else ``intact``. With
    ``detect_rescale``, function-preserving rescales are recognised and undone first.
    Neurons are named by reference index (``resynced`` is in reference order). ``progress``
    (``findlady_core.progress``) hears phase ``integrity`` in neurons checked.
    """
    start = time.perf_counter()
    tol, ctol = _check_tolerances(tolerance, cos_tolerance)
    spec.validate(reference)
    check_compatible(reference, resynced)
    sus: Mapping[str, torch.Tensor] = resynced  # a lazy state dict stays lazy: tensors are read per group
    rescaled: list[dict[str, Any]] = []
    if detect_rescale:
        scales = _find_rescales(reference, sus, spec, tol, ctol)
        for g in spec.groups:
            lg = scales.log[g.name]
            for i in torch.nonzero(lg).flatten().tolist():
                rescaled.append({"group": g.name, "neuron": int(i), "factor": float(math.exp(float(lg[i])))})
        if rescaled:
            sus = _apply_inverse(sus, scales)
    units, unpermuted = _units(spec, reference)
    flagged: list[tuple[float, int, int, dict[str, Any]]] = []
    groups: dict[str, dict[str, Any]] = {}
    max_lr = 0.0
    min_cos = 1.0
    neurons = 0
    total = sum(g.size for g in units)
    tick(progress, "integrity", 0, total)
    for g in units:
        own, stats = _Pairs.zeros(g.size), _Pairs.zeros(g.size)
        for m in g.out_members:
            (stats if is_statistic(m.tensor) else own).add(_rows(reference[m.tensor], m, g.size), _rows(sus[m.tensor], m, g.size))
        lr, cos = own.log_ratio(), own.cosine()
        slr, scos = stats.log_ratio(), stats.cosine()
        severity = torch.maximum(
            torch.maximum(lr.abs() / tol, (1 - cos) / ctol), torch.maximum(slr.abs() / tol, (1 - scos) / ctol)
        )
        bad = severity > 1
        idx = torch.nonzero(bad).flatten()
        if idx.numel():  # one conversion per group, not one per flagged neuron
            ratios, coss = torch.exp(lr[idx]).tolist(), cos[idx].tolist()
            sevs = severity[idx].tolist()
            s_bad = (stats.present[idx] & ((slr[idx].abs() > tol) | (scos[idx] < 1 - ctol))).tolist()
            s_ratio, s_cos = torch.exp(slr[idx]).tolist(), scos[idx].tolist()
            for j, i in enumerate(idx.tolist()):
                row: dict[str, Any] = {"group": g.name, "neuron": i, "norm_ratio": ratios[j], "cosine": coss[j]}
                if s_bad[j]:
                    row["statistics_norm_ratio"] = s_ratio[j]
                    row["statistics_cosine"] = s_cos[j]
                flagged.append((-sevs[j], len(groups), i, row))
        g_max = float(lr.abs().max()) if g.size else 0.0
        max_lr = max(max_lr, g_max)
        min_cos = min(min_cos, float(cos.min()) if g.size else 1.0)
        neurons += g.size
        groups[g.name] = {
            "neurons": g.size,
            "flagged": int(bad.sum()),
            "rescaled": sum(1 for r in rescaled if r["group"] == g.name),
            "max_abs_log_norm_ratio": g_max,
            "min_cosine": float(cos.min()) if g.size else 1.0,
            "permuted": g.name not in unpermuted,
        }
        tick(progress, "integrity", neurons, total)
    flagged.sort(key=lambda x: x[:3])  # most deviant first, then spec order
    rescaled.sort(key=lambda r: -abs(math.log(r["factor"])))
    return IntegrityResult(
        status="modified" if flagged else "intact",
        tolerance=tol,
        cos_tolerance=ctol,
        flagged=[x[3] for x in flagged],
        rescaled=rescaled,
        max_abs_log_norm_ratio=max_lr,
        min_cosine=min_cos,
        neurons=neurons,
        groups=groups,
        unpermuted_layers=unpermuted,
        seconds=time.perf_counter() - start,
        state_dict=sus,
    )


def correct_norms(
    reference: Mapping[str, torch.Tensor],
    resynced: Mapping[str, torch.Tensor],
    spec: Spec,
    flagged: Iterable[Mapping[str, Any]],
) -> dict[str, torch.Tensor]:
    """Scale each flagged neuron's own parameters back to the reference norm (paper 3.4: "any
    modification to the norm can be detected and corrected"). Undoes the scaling attack
    exactly; a change of direction stays (only the norm is restored). Running statistics
    are left alone. Returns a new state dict; ``flagged`` is ``IntegrityResult.flagged``."""
    units, _ = _units(spec, reference)
    by_name = {g.name: g for g in units}
    out = dict(resynced)
    per_group: dict[str, list[int]] = {}
    for r in flagged:
        name = str(r["group"])
        if name not in by_name:
            raise InputError(f"flagged neuron names group {name!r}, which neither the spec nor the weights have")
        i = int(r["neuron"])
        if not 0 <= i < by_name[name].size:
            raise InputError(f"flagged neuron {i} is not in group {name!r} (size {by_name[name].size})")
        per_group.setdefault(name, []).append(i)
    for name, idx_list in per_group.items():
        g = by_name[name]
        members = g.own_members
        acc = _Pairs.zeros(g.size)
        for m in members:
            acc.add(_rows(reference[m.tensor], m, g.size), _rows(out[m.tensor], m, g.size))
        factor = torch.where(acc.ss > 0, torch.sqrt(acc.rr / torch.where(acc.ss > 0, acc.ss, torch.ones_like(acc.ss))), torch.ones_like(acc.ss))
        idx = torch.tensor(sorted(set(idx_list)), dtype=torch.int64)
        for m in members:
            t = out[m.tensor]
            new = t.detach().clone()
            pos = (m.offset + idx.view(-1, 1) * m.block + torch.arange(m.block)).flatten()
            f = factor[idx].repeat_interleave(m.block)
            shape = [1] * t.dim()
            shape[m.axis] = pos.numel()
            sel = new.index_select(m.axis, pos).to(torch.float64) * f.view(shape)
            new.index_copy_(m.axis, pos, sel.to(t.dtype))
            out[m.tensor] = new
    return out
