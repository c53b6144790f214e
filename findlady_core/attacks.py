"""Seedable perturbations of a state dict (paper sections 3.1 and 3.4).

Every function returns a NEW dict and leaves its input untouched; tensors an attack does not
touch are shared with the input, not copied (treat tensors as immutable). Attacks compose
with each other and with the permutation attack in any order.

Targets: with a group, that group's own parameters (the paper's
"l-th layer": its weight rows, bias and norm parameters); otherwise every floating tensor of
two or more dimensions. BatchNorm running statistics are never targets: they are estimates
of activations, not weights, and noise could make a variance negative.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from findlady_core.errors import InputError
from findlady_core.permute import (
    apply_permutations,
    random_permutations,
    recovering_permutations,
)
from findlady_core.spec import Spec

StateDict = Mapping[str, torch.Tensor]
def attack_targets(state_dict: StateDict, spec: Spec | None = None, group: str | None = None) -> list[str]:
    """Names of the tensors an attack hits, in state-dict order.

    With ``group`` (needs ``spec``): the floating tensors of that group's ``role: out``
    members. Without: every floating tensor with two or more dimensions.
    """
    if group is None:
        return [k for k, t in state_dict.items() if t.is_floating_point() and t.dim() >= 2]
    if spec is None:
        raise InputError(f"attack on group {group!r} needs a spec")
    g = spec.group(group)
    own = set()
    for m in g.own_members:
        t = state_dict.get(m.tensor)
        if t is None:
            raise InputError(f"group {group!r}: tensor {m.tensor!r} is not in the weights")
        if t.is_floating_point() and t.dim() >= 1:
            own.add(m.tensor)
    if not own:
        raise InputError(f"group {group!r} has no floating parameters of its own to attack")
    return [k for k in state_dict if k in own]


def _check_targets(state_dict: StateDict, targets: list[str]) -> None:
    if isinstance(targets, str):
        raise InputError("targets must be a list of tensor names, not a string")
    if not targets:
        raise InputError("no tensors to attack (empty target list)")
    if len(set(targets)) != len(targets):
        raise InputError("a tensor is listed twice in the targets")
    for name in targets:
        t = state_dict.get(name)
        if t is None:
            raise InputError(f"attack target {name!r} is not in the weights")
        if not t.is_floating_point():
            raise InputError(f"attack target {name!r} is {t.dtype}, not floating point")


def _tensor_seed(seed: int, name: str) -> int:
    """A seed per (seed, tensor name): a tensor's noise does not depend on the other targets."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian_noise(state_dict: StateDict, omega: float, *, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """``w + N(0, (omega * std(w))^2)`` per target tensor, std over the whole tensor (paper 3.1)."""
    if not isinstance(omega, (int, float)) or isinstance(omega, bool) or not math.isfinite(omega) or omega < 0:
        raise InputError(f"noise level omega must be a finite number >= 0, got {omega!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    _check_targets(state_dict, targets)
    out = dict(state_dict)
    for name in targets:
        t = state_dict[name]
        w = t.detach().to(torch.float32)
        std = float(w.std(correction=0)) if w.numel() else 0.0
        gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device)
        out[name] = (w + noise * (omega * std)).to(t.dtype)
    return out


def quantize(state_dict: StateDict, bits: int, *, targets: list[str]) -> dict[str, torch.Tensor]:
    """Uniform quantization of each target to ``2**bits`` levels between its min and max,
    dequantized back to its dtype (paper 3.1)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
        raise InputError(f"bits must be an integer in [1, 32], got {bits!r}")
    _check_targets(state_dict, targets)
    out = dict(state_dict)
    levels = 2**bits - 1  # number of steps between min and max
    for name in targets:
        t = state_dict[name]
        if t.numel() == 0:
            continue
        # float64: 2**32 levels need more than float32's 24-bit mantissa.
        w = t.detach().to(torch.float64)
        lo, hi = w.min(), w.max()
        if hi == lo:
            out[name] = t.clone()
            continue
        step = (hi - lo) / levels
        q = torch.round((w - lo) / step).clamp_(0, levels)
        out[name] = (lo + q * step).to(t.dtype)
    return out


def prune(
    state_dict: StateDict,
    fraction: float,
    *,
    targets: list[str],
    scope: Literal["layer", "global"] = "layer",
) -> dict[str, torch.Tensor]:
    """Magnitude pruning: zero the ``fraction`` of smallest ``|w|`` per tensor (``layer``) or
    across all targets together (``global``). Exactly ``round(fraction * n)`` entries are zeroed;
    ties are broken by position so the result is deterministic."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
        raise InputError(f"prune fraction must be in [0, 1), got {fraction!r}")
    if scope not in ("layer", "global"):
        raise InputError(f"prune scope must be 'layer' or 'global', got {scope!r}")
    _check_targets(state_dict, targets)
    out = dict(state_dict)
    if scope == "layer":
        for name in targets:
            t = state_dict[name]
            mask = _smallest_mask(t.detach().abs().flatten().to(torch.float32), fraction)
            out[name] = t.detach().flatten().masked_fill(mask, 0).view_as(t)
        return out
    flat = torch.cat([state_dict[n].detach().abs().flatten().to(torch.float32).cpu() for n in targets])
    mask = _smallest_mask(flat, fraction)
    start = 0
    for name in targets:
        t = state_dict[name]
        m = mask[start:start + t.numel()].to(t.device)
        start += t.numel()
        out[name] = t.detach().flatten().masked_fill(m, 0).view_as(t)
    return out


def _smallest_mask(mag: torch.Tensor, fraction: float) -> torch.Tensor:
    k = round(fraction * mag.numel())
    mask = torch.zeros(mag.numel(), dtype=torch.bool, device=mag.device)
    if k:
        mask[torch.argsort(mag, stable=True)[:k]] = True
    return mask


def scale_neurons(
    state_dict: StateDict, spec: Spec, group: str, neurons: list[int], k: float
) -> dict[str, torch.Tensor]:
    """``w -> (1 + k) w`` on the given neurons' own parameters (paper 3.4).

    For each ``role: out`` member of ``group`` (except BatchNorm running statistics), the index
    range of each neuron along the member's axis (its row, its bias entry, or its whole block)
    is scaled; everything else is unchanged.
    """
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not math.isfinite(k):
        raise InputError(f"scale k must be a finite number, got {k!r}")
    g = spec.group(group)
    if not neurons:
        raise InputError("no neurons given to scale")
    for i in neurons:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < g.size:
            raise InputError(f"neuron {i!r} is not in group {group!r} (size {g.size})")
    if len(set(neurons)) != len(neurons):
        raise InputError("a neuron is listed twice")
    targets = set(attack_targets(state_dict, spec, group))
    spec.select([group]).validate(state_dict)
    idx_neurons = torch.tensor(sorted(neurons), dtype=torch.int64)
    out = dict(state_dict)
    for m in g.out_members:
        if m.tensor not in targets:
            continue
        t = out[m.tensor]  # a tensor may carry two members of one group only on distinct axes
        idx = (m.offset + idx_neurons.view(-1, 1) * m.block + torch.arange(m.block)).flatten().to(t.device)
        new = t.detach().clone()
        sel = new.index_select(m.axis, idx)
        new.index_copy_(m.axis, idx, sel * (1 + k))
        out[m.tensor] = new
    return out


@dataclass(frozen=True)
class PermutationAttack:
    """A permuted state dict, the attack's permutations ``q`` and the recovering ``p`` (truth)."""

    state_dict: dict[str, torch.Tensor]
    attack: dict[str, torch.Tensor]
    truth: dict[str, torch.Tensor]


def permute(state_dict: StateDict, spec: Spec, groups: list[str] | None = None, seed: int = 0) -> PermutationAttack:
    """Permute the named groups (all when None) at random; function-preserving.

    ``truth`` holds, per group, the permutation that re-synchronizes the result (the
    convention of ``findlady_core.permute``): applying it with ``apply_permutations`` gives back ``state_dict`` exactly.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if groups is not None and not groups:
        raise InputError("no groups to permute (empty list)")
    spec.validate(state_dict)
    attack = random_permutations(spec, groups, seed=seed)
    permuted = apply_permutations(state_dict, spec, attack)
    truth = recovering_permutations(spec, attack, {k: v.shape for k, v in state_dict.items()})
    return PermutationAttack(permuted, attack, truth)
