"""Scalings on linear paths, found and undone: any ``c != 0``, no activation in between.

Two places where a neuron can be scaled by any non-zero ``c`` without changing the function
(the ReLU rescales of ``findlady_core.integrity`` need ``c > 0`` and a homogeneous activation):

* **SwiGLU** (``act(gate x) * (up x)`` then ``down``): a neuron's ``up`` row (and bias) times
  ``c``, its ``down`` column times ``1 / c``; ``gate`` stays. Which own member is ``up`` is read
  from the tensor names (``up_proj``, ``w3``, ``up``, ``fc_up``): nothing else in a spec says
  which branch goes through the activation, and scaling ``gate`` is no symmetry.
* **a conv channel with its BatchNorm** (eval mode): the conv's row (and bias) times ``c``, the
  BN's running mean times ``c``, its running variance times ``c^2`` and its weight times
  ``sqrt(c^2 var + eps) / (c sqrt(var + eps))`` leave the BN's output, and so everything
  after it, unchanged. ``eps`` is PyTorch's default, ``BN_EPS`` (not stored in a state dict).
  The conv feeding a BN is the conv of the same parent module (``convolution`` /
  ``normalization``, ``conv1`` / ``bn1``, ``downsample.0`` / ``downsample.1``).

Per neuron, on a suspect already in reference order, ``c`` is **fit on one side and checked on
the other**: SwiGLU fits on ``up`` and checks ``down``; BatchNorm fits ``c^2`` on the running
variance and its sign on the BN weight, and checks the conv weights, the running mean and the
BN bias. A neuron's scale is undone only when the held-out relative residual is at most
``SCALE_RESIDUAL`` and clearly below that of no scale (``IDENTITY_GAIN``): an unrelated
neuron's fitted ``c`` does not explain the other side. The fitted tensors are left out of
the similarity evidence afterwards.
"""

from __future__ import annotations

import re
from collections import ChainMap
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from findlady_core.permute import apply_permutations, member_rows
from findlady_core.spec import Group, Member, Spec

SCALE_RESIDUAL = 0.5
"""Held-out relative residual up to which a fitted linear-path scale is undone (docs/obfuscation.md)."""
IDENTITY_GAIN = 0.5
BN_EPS = 1e-5
_UP = re.compile(r"(^|\.)(up_proj|w3|up|fc_up)$")


def _module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else ""


@dataclass(frozen=True)
class ScaleUnit:
    """``swiglu``: ``fit`` = up (weight, bias), ``check`` = down columns. ``batchnorm``:
    ``conv`` = the conv's own members, ``bn`` = module of the statistics."""

    kind: str
    group: Group
    fit: tuple[Member, ...]
    check: tuple[Member, ...]
    bn: str = ""

    @property
    def fitted_tensors(self) -> set[str]:
        if self.kind == "swiglu":
            return {m.tensor for m in self.fit}
        return {f"{self.bn}.running_var", f"{self.bn}.weight"}


def _conv_for(bn: str, weights: list[Member]) -> list[Member]:
    """The conv weight of ``bn``'s parent module feeding it (module docstring)."""
    parent, last = bn.rsplit(".", 1) if "." in bn else ("", bn)
    same = [m for m in weights if _module(_module(m.tensor)) == parent]
    if len(same) <= 1:
        return same
    digits = re.search(r"\d*$", last).group()  # type: ignore[union-attr]
    if last.isdigit():
        want = f"{parent}.{int(last) - 1}"
    elif digits:
        want = f"{parent}.conv{digits}" if parent else f"conv{digits}"
    else:
        return []
    return [m for m in same if _module(m.tensor) == want]


def scale_units(spec: Spec, shapes: Mapping[str, Any]) -> list[ScaleUnit]:
    units = []
    for g in spec.groups:
        own = [m for m in g.own_members if len(shapes[m.tensor]) >= 2]
        ins = [m for m in g.in_members if len(shapes[m.tensor]) >= 2]
        stats = {_module(m.tensor) for m in g.out_members if m.tensor.endswith("running_mean")}
        if not stats and len(own) >= 2 and ins:
            up = [m for m in own if _UP.search(_module(m.tensor))]
            if len(up) == 1:
                mod = _module(up[0].tensor)
                fit = tuple(m for m in g.own_members if _module(m.tensor) == mod)
                units.append(ScaleUnit("swiglu", g, fit, tuple(ins)))
        for bn in sorted(stats):
            members = {m.tensor: m for m in g.members}
            need = [f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
            conv = _conv_for(bn, [m for m in own if _module(m.tensor) not in stats])
            if len(conv) != 1 or not all(t in members for t in need):
                continue
            cmod = _module(conv[0].tensor)
            convs = tuple(m for m in g.own_members if _module(m.tensor) == cmod)
            units.append(ScaleUnit("batchnorm", g, convs, tuple(members[t] for t in need), bn))
    return units


def _rows(sd: Mapping[str, torch.Tensor], m: Member, n: int) -> torch.Tensor:
    return member_rows(sd[m.tensor], m, n).double()


def _cat(sd: Mapping[str, torch.Tensor], members: tuple[Member, ...], n: int) -> torch.Tensor:
    return torch.cat([_rows(sd, m, n) for m in members], 1)


def _rel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).norm(dim=1) / y.norm(dim=1).clamp_min(1e-300)


def _fit(ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], u: ScaleUnit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per neuron: ``c``, the held-out residual with ``c`` and without a scale."""
    n = u.group.size
    if u.kind == "swiglu":
        r, s = _cat(ref, u.fit, n), _cat(sus, u.fit, n)
        c = (r * s).sum(1) / r.square().sum(1).clamp_min(1e-300)
        c = torch.where(c.abs() > 1e-12, c, torch.ones_like(c))
        yr, ys = _cat(ref, u.check, n), _cat(sus, u.check, n)
        return c, _rel(yr / c[:, None], ys), _rel(yr, ys)
    w, b, mean, var = (ref[m.tensor].double() for m in u.check)
    ws, bs, means, vars_ = (sus[m.tensor].double() for m in u.check)
    c = torch.sqrt((vars_ / var.clamp_min(1e-300)).clamp_min(0)) * torch.where(ws * w < 0, -1.0, 1.0)
    c = torch.where(c.abs() > 1e-12, c, torch.ones_like(c))

    conv_r, conv_s = _cat(ref, u.fit, n), _cat(sus, u.fit, n)
    bn_s = torch.stack([means, ws, bs], 1)

    def residual(c: torch.Tensor) -> torch.Tensor:
        """The worse of the conv rows and the BN's (mean, weight, bias): each must agree on its
        own (a neuron's three BN numbers alone are too little evidence)."""
        gamma = w * torch.sqrt(c * c * var + BN_EPS) / (c * torch.sqrt(var + BN_EPS))
        return torch.maximum(_rel(conv_r * c[:, None], conv_s), _rel(torch.stack([mean * c, gamma, b], 1), bn_s))

    return c, residual(c), residual(torch.ones_like(c))


def _undo(sd: MutableMapping[str, torch.Tensor], u: ScaleUnit, c: torch.Tensor) -> None:
    """Divide ``c`` out of the suspect (``c = 1`` where nothing is undone)."""
    def scale(m: Member, f: torch.Tensor) -> None:
        t = sd[m.tensor]
        shape = [1] * t.dim()
        shape[m.axis] = t.shape[m.axis]
        full = torch.ones(t.shape[m.axis], dtype=torch.float64)
        full[m.offset:m.offset + u.group.size * m.block] = f.repeat_interleave(m.block)
        sd[m.tensor] = (t.double() * full.view(shape)).to(t.dtype)

    for m in u.fit:
        scale(m, 1 / c)
    if u.kind == "swiglu":
        for m in u.check:
            scale(m, c)
        return
    w, _, mean, var = u.check
    v_s = sd[var.tensor].double()
    v_u = v_s / (c * c)
    scale(w, c * torch.sqrt(v_u + BN_EPS) / torch.sqrt(v_s + BN_EPS))
    scale(mean, 1 / c)
    scale(var, 1 / (c * c))


def _rematch(ref: Mapping[str, torch.Tensor], sus: Mapping[str, torch.Tensor], g: Group) -> torch.Tensor:
    """``p[i]``: the suspect neuron of reference neuron i on the group's members' *absolute*
    cosines, blind to a per-neuron ``c`` of either sign (the solver's signed similarity is
    pulled apart by a negative ``c`` on two of SwiGLU's three tensors)."""
    s = torch.zeros(g.size, g.size, dtype=torch.float64)
    for m in g.members:
        a, b = _rows(ref, m, g.size), _rows(sus, m, g.size)
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
        s += (a @ b.T).abs()
    rows, cols = linear_sum_assignment(s.numpy(), maximize=True)
    p = torch.empty(g.size, dtype=torch.int64)
    p[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return p


REMATCH_SWEEPS = 2  # a conv's rows read the previous group's order: sweep the groups twice


def _fits(reference: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], units: list[ScaleUnit],
          threshold: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per unit ``(c, residual, taken)``; units do not depend on each other's undo (a BatchNorm
    scale leaves every consumer alone, a SwiGLU scale touches its own group only)."""
    out = []
    for u in units:
        c, res, ident = _fit(reference, sd, u)
        out.append((c, res, (res <= threshold) & (res < IDENTITY_GAIN * ident)))
    return out


def undo_linear_scales(
    reference: Mapping[str, torch.Tensor], resynced: Mapping[str, torch.Tensor], spec: Spec,
    threshold: float = SCALE_RESIDUAL,
) -> tuple[MutableMapping[str, torch.Tensor], list[dict[str, Any]], dict[str, torch.Tensor], set[str]]:
    """On a suspect in reference order: the state dict with accepted scales undone, one
    ``scale`` transform per unit, the permutations applied on top of ``resync``'s (the groups
    re-matched blind to the scales, kept when that explains more neurons), and the tensors a
    fit used."""
    units = scale_units(spec, {k: v.shape for k, v in reference.items()})
    state: Mapping[str, torch.Tensor] = resynced
    fits = _fits(reference, state, units, threshold)
    perms: dict[str, torch.Tensor] = {}
    # re-match only where some neurons show a scale and others do not (a negative c the signed
    # solver paired wrongly): a suspect with no scale at all (every verification of a plain copy)
    # would pay a blind re-match of every group, an assignment per group and sweep, for nothing
    if any(bool(t.any()) for _, _, t in fits) and not all(bool(t.all()) for _, _, t in fits):
        moved, total = dict(resynced), {}
        names = [g.name for g in spec.groups if any(u.group.name == g.name for u in units)]
        for _ in range(REMATCH_SWEEPS):
            for name in names:
                p = _rematch(reference, moved, spec.group(name))
                moved = apply_permutations(moved, spec, {name: p})
                total[name] = total[name][p] if name in total else p
        fits2 = _fits(reference, moved, units, threshold)
        if sum(int(t.sum()) for _, _, t in fits2) > sum(int(t.sum()) for _, _, t in fits):
            state, fits = moved, fits2
            perms = {k: p for k, p in total.items() if not torch.equal(p, torch.arange(p.numel()))}
    out: MutableMapping[str, torch.Tensor] = ChainMap({}, state)  # changed tensors over the rest, unread
    transforms: list[dict[str, Any]] = []
    fitted: set[str] = set()
    for u, (c, res, take) in zip(units, fits):
        if not bool(take.any()):
            continue
        _undo(out, u, torch.where(take, c, torch.ones_like(c)))
        idx = torch.nonzero(take).flatten()
        fitted |= u.fitted_tensors
        transforms.append({
            "kind": "scale", "group": u.group.name, "neurons": idx.tolist(), "factors": c[idx].tolist(),
            "residual": float(res[idx].max()), "function_preserving": True,
            "path": "SwiGLU up x c, down x 1/c" if u.kind == "swiglu" else f"conv channel x c through BatchNorm {u.bn}",
            "checked": "fit on up, checked on down" if u.kind == "swiglu"
            else "c^2 fit on the running variance (sign on the BN weight), checked on the conv weights, running mean and BN bias",
        })
    if not transforms:
        return ChainMap({}, resynced), [], {}, set()
    return out, transforms, perms, fitted


def scale_linear(sd: Mapping[str, torch.Tensor], spec: Spec, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The attack: every neuron of every unit scaled by its own ``c``, ``|c|`` log-uniform in
    [0.25, 4], sign at random (function-preserving: the module docstring's symmetries)."""
    units = scale_units(spec, {k: v.shape for k, v in sd.items()})
    gen = torch.Generator().manual_seed(seed + 7005)
    out = dict(sd)
    for u in units:
        n = u.group.size
        c = torch.exp((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * torch.log(torch.tensor(4.0)))
        c = c * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
        _undo(out, u, 1 / c)  # undoing 1/c applies c
    return out
