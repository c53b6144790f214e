"""Fold norm weights into the projections that read them, rotate the stream, and unfold.

Folding (function-preserving): a norm's output ``g * n(x) + b`` feeds readers ``W``; with
``W' = W diag(g)`` along the stream axis and the norm's weight set to ones, the readers see the
same values. A LayerNorm bias moves into the readers' biases (``c' = c + W b``) when every
reader has one; otherwise (GPT-2's final norm feeds a head without bias) it stays in the norm
as ``b / g``, a stream vector that rotates with the stream. After folding, every norm is a plain
``n(x)`` (RMS or centred LayerNorm) and commutes with the stream's rotations.

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
MIN_NORM_WEIGHT = 1e-8  # a norm weight this close to 0 cannot fold its bias as b / g


def _shape(v: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    """``v`` (length d) shaped to broadcast along ``t``'s ``axis``."""
    shape = [1] * t.dim()
    shape[axis] = -1
    return v.view(shape)


def _bias_of(W: torch.Tensor, axis: int, b: torch.Tensor) -> torch.Tensor:
    """``W b``: the reader's output for the constant input ``b`` (summed over the stream axis)."""
    return (W * _shape(b, W, axis)).sum(dim=axis)


def with_head(state_dict: StateDict, family: StreamFamily) -> dict[str, torch.Tensor]:
    """The state dict with the output head as its own tensor (a copy of the tied table when the
    weights store it once), ready to be folded apart from the table."""
    out = dict(state_dict)
    if family.head and family.head not in out:
        out[family.head] = out[family.tied_to].clone()
    return out


def fold(state_dict: StateDict, family: StreamFamily) -> dict[str, torch.Tensor]:
    """Every norm's weight (and LayerNorm bias) folded into its readers; the norms left plain.

    Function-preserving; a tied head becomes its own tensor (folding unties it)."""
    out = with_head(state_dict, family)
    for norm in family.norms:
        g0 = out[norm.weight]
        g = g0.double()
        b = out[norm.bias].double() if norm.bias else None
        keep_bias = b is not None and any(r.bias is None for r in norm.readers)
        for r in norm.readers:
            W = out[r.weight].double()
            if b is not None and not keep_bias:
                out[r.bias] = (out[r.bias].double() + _bias_of(W, r.axis, b)).to(out[r.bias].dtype)
            out[r.weight] = (W * _shape(g, W, r.axis)).to(out[r.weight].dtype)
        if b is not None:
            if keep_bias:
                if bool((g.abs() < MIN_NORM_WEIGHT).any()):
                    raise InputError(f"norm {norm.weight!r} has a weight near 0: its bias cannot be folded")
                out[norm.bias] = (b / g).to(out[norm.bias].dtype)
            else:
                out[norm.bias] = torch.zeros_like(out[norm.bias])
        out[norm.weight] = torch.ones_like(g0)
    return out


def unfold(folded: StateDict, family: StreamFamily, like: StateDict) -> dict[str, torch.Tensor]:
    """Undo ``fold`` with the norm parameters of ``like``: ``fold(unfold(f, fam, like), fam) == f``
    (up to rounding) when ``f`` is folded. Leaves out the head when ``like`` stores it tied."""
    out = dict(folded)
    for norm in family.norms:
        g = like[norm.weight].double()
        if bool((g.abs() < MIN_NORM_WEIGHT).any()):
            raise InputError(f"reference norm {norm.weight!r} has a weight near 0: cannot unfold onto it")
        b = like[norm.bias].double() if norm.bias else None
        keep_bias = b is not None and any(r.bias is None for r in norm.readers)
        for r in norm.readers:
            W = out[r.weight].double() / _shape(g, out[r.weight], r.axis)
            if b is not None and not keep_bias:
                out[r.bias] = (out[r.bias].double() - _bias_of(W, r.axis, b)).to(out[r.bias].dtype)
            out[r.weight] = W.to(out[r.weight].dtype)
        if b is not None:
            if keep_bias:
                out[norm.bias] = (out[norm.bias].double() * g).to(out[norm.bias].dtype)
            else:
                # the folded bias moved into the readers; what is left there beyond b is kept
                out[norm.bias] = (out[norm.bias].double() + b).to(out[norm.bias].dtype)
        out[norm.weight] = like[norm.weight].clone().to(folded[norm.weight].dtype)
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
