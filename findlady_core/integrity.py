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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from findlady_core.compat import check_compatible
from findlady_core.errors import InputError
from findlady_core.progress import Progress, tick
from findlady_core.rescale import _apply_inverse, _find_rescales, _Pairs, _rows, undo_rescale  # noqa: F401
from findlady_core.spec import Group, Member, Spec, is_statistic

DEFAULT_TOLERANCE = 0.01
REPORT_MAX_FLAGGED = 100


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
    scales = None
    if detect_rescale:
        scales = _find_rescales(reference, sus, spec, tol, ctol)
        for g in spec.groups:
            lg = scales.log[g.name]
            for i in torch.nonzero(lg).flatten().tolist():
                rescaled.append({"group": g.name, "neuron": int(i), "factor": float(math.exp(float(lg[i])))})
        if rescaled:
            sus = _apply_inverse(sus, scales)
            scales = None  # its sums were taken on the suspect before the undo
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
            if is_statistic(m.tensor):
                stats.add(_rows(reference[m.tensor], m, g.size), _rows(sus[m.tensor], m, g.size))
            elif scales is not None:  # unscaled rows against the same suspect: the search's sums, once
                own.add_sums(*scales.plain_sums(reference, sus, m, g.size))
            else:
                own.add(_rows(reference[m.tensor], m, g.size), _rows(sus[m.tensor], m, g.size))
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


__all__ = ["DEFAULT_TOLERANCE", "REPORT_MAX_FLAGGED", "IntegrityResult", "check_integrity", "correct_norms",
           "default_cos_tolerance", "undo_rescale"]
