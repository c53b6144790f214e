"""Fold norm weights into the projections that read them, rotate the stream, and unfold.

Folding (function-preserving): a norm's output ``g * n(x) + b = g * (n(x) + b / g)`` feeds
readers ``W``; with ``W' = W diag(g)`` along the stream axis, the norm's weight set to ones and
its bias to ``b / g``, the readers see the same values. After folding, every norm is a plain
``n(x)`` (RMS, or LayerNorm's centring and scaling) plus a bias that is a stream vector, and
both commute with the stream's rotations (the bias rotates with the stream). The readers'
own biases are left alone: moving ``b`` into them would turn a zero bias into rounding noise
when the suspect is unfolded again.

Unfolding undoes a fold with given norm parameters (the reference's): a suspect that was folded
and rotated, once rotated back, is put in the reference's parameterization, so the permutation
spec, integrity and the watermark read it tensor by tensor as usual.

All arithmetic is in float64; results are cast back to each tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from findlady_core.errors import InputError
from findlady_core.rotation.family import StreamFamily

StateDict = Mapping[str, torch.Tensor]
MIN_NORM_WEIGHT = 1e-8  # a norm weight this close to 0 cannot carry its bias as b / g


def _shape(v: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    """``v`` (length d) shaped to broadcast along ``t``'s ``axis``."""
    shape = [1] * t.dim()
    shape[axis] = -1
    return v.view(shape)


def with_head(state_dict: StateDict, family: StreamFamily) -> dict[str, torch.Tensor]:
    """The state dict with the output head as its own tensor (a copy of the tied table when the
    weights store it once), ready to be folded apart from the table."""
    out = dict(state_dict)
    if family.head and family.head not in out:
        out[family.head] = out[family.tied_to].clone()
    return out


def _norm_weight(sd: StateDict, name: str, which: str) -> torch.Tensor:
    g = sd[name].double()
    if bool((g.abs() < MIN_NORM_WEIGHT).any()):
        raise InputError(f"{which} norm {name!r} has a weight near 0: its bias cannot be folded")
    return g


def fold(state_dict: StateDict, family: StreamFamily) -> dict[str, torch.Tensor]:
    """Every norm's weight folded into its readers, its bias (LayerNorm) divided by it; the
    norms' weights left as ones. Function-preserving; a tied head becomes its own tensor."""
    out = with_head(state_dict, family)
    for norm in family.norms:
        g = _norm_weight(out, norm.weight, "the model's") if norm.bias else out[norm.weight].double()
        for r in norm.readers:
            W = out[r.weight]
            out[r.weight] = (W.double() * _shape(g, W, r.axis)).to(W.dtype)
        if norm.bias:
            out[norm.bias] = (out[norm.bias].double() / g).to(out[norm.bias].dtype)
        out[norm.weight] = torch.ones_like(out[norm.weight])
    return out


def unfold(folded: StateDict, family: StreamFamily, like: StateDict) -> dict[str, torch.Tensor]:
    """Undo ``fold`` with the norm weights of ``like``: ``unfold(fold(sd), fam, like=sd) == sd``
    up to rounding. Leaves out the head when ``like`` stores it tied (absent)."""
    out = dict(folded)
    for norm in family.norms:
        g = _norm_weight(like, norm.weight, "reference")
        for r in norm.readers:
            W = out[r.weight]
            out[r.weight] = (W.double() / _shape(g, W, r.axis)).to(W.dtype)
        if norm.bias:
            out[norm.bias] = (out[norm.bias].double() * g).to(out[norm.bias].dtype)
        out[norm.weight] = like[norm.weight].to(folded[norm.weight].dtype).clone()
    if family.head and family.head not in like:
        out.pop(family.head, None)
    return out


def rotate(state_dict: StateDict, family: StreamFamily, Q: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x -> Q x`` on the stream: every stream axis multiplied by ``Q`` (d x d, orthogonal).

    Function-preserving on a folded model (for LayerNorm: when ``Q`` fixes the ones vector)."""
    d = family.hidden
    if tuple(Q.shape) != (d, d):
        raise InputError(f"rotation must be {d} x {d}, got {tuple(Q.shape)}")
    out = dict(state_dict)
    Qd = Q.detach().double().cpu()
    for name, axis in family.stream:
        if name not in out:  # a tied head not written out yet
            continue
        t = out[name]
        r = torch.tensordot(Qd, t.detach().double().cpu(), dims=([1], [axis]))
        out[name] = torch.movedim(r, 0, axis).to(dtype=t.dtype, device=t.device).contiguous()
    return out
