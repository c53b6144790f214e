"""Apply permutations to groups of a state dict (paper section 2, eq. 4-5).

One convention everywhere (docs/architecture.md): applying ``p`` to a group means
``t.index_select(axis, expand(p))`` on every member axis. An attack with ``q`` gives
``suspect = reference[q]``; ``p = argsort(q)`` recovers it. Nested groups apply in spec order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from findlady_core.errors import SpecError
from findlady_core.spec import Group, Member, Spec

Perms = Mapping[str, torch.Tensor]
AxisKey = tuple[str, int]


def as_perm(p: object, size: int, name: str = "") -> torch.Tensor:
    """Return ``p`` as a CPU int64 tensor after checking it is a permutation of ``range(size)``."""
    t = torch.as_tensor(p, dtype=torch.int64).flatten().cpu()
    if t.numel() != size or not torch.equal(torch.sort(t).values, torch.arange(size)):
        raise SpecError(f"group {name!r}: not a permutation of range({size})")
    return t


def expand(p: torch.Tensor, member: Member, length: int) -> torch.Tensor:
    """Index map of length ``length`` for one member: ``p`` acting on blocks of ``member.block``."""
    idx = torch.arange(length)
    b = member.block
    lo, hi = member.span(p.numel())
    idx[lo:hi] = (member.offset + (p.view(-1, 1) * b + torch.arange(b)).flatten())
    return idx


def index_maps(spec: Spec, perms: Perms, shapes: Mapping[str, torch.Size]) -> dict[AxisKey, torch.Tensor]:
    """Composed index map per (tensor, axis): the result of the groups applied in spec order.

    ``permuted[t] = original[t].index_select(axis, map)`` for every touched axis.
    """
    maps: dict[AxisKey, torch.Tensor] = {}
    for g in spec.groups:
        if g.name not in perms:
            continue
        p = as_perm(perms[g.name], g.size, g.name)
        for m in g.members:
            key = (m.tensor, m.axis)
            length = shapes[m.tensor][m.axis]
            cur = maps.get(key)
            step = expand(p, m, length)
            maps[key] = step if cur is None else cur[step]
    return maps


def apply_maps(state_dict: Mapping[str, torch.Tensor], maps: Mapping[AxisKey, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with each mapped axis re-indexed; other tensors are shared, not copied."""
    out = dict(state_dict)
    for (name, axis), idx in maps.items():
        t = out[name]
        out[name] = t.index_select(axis, idx.to(t.device))
    return out


def apply_permutations(state_dict: Mapping[str, torch.Tensor], spec: Spec, perms: Perms) -> dict[str, torch.Tensor]:
    """Apply ``perms`` (group name -> permutation) to ``state_dict``; function-preserving."""
    unknown = set(perms) - set(spec.names)
    if unknown:
        raise SpecError(f"permutations given for groups the spec lacks: {sorted(unknown)[:5]}")
    shapes = {k: v.shape for k, v in state_dict.items()}
    return apply_maps(state_dict, index_maps(spec, perms, shapes))


def apply_group(
    state_dict: dict[str, torch.Tensor], group: Group, p: torch.Tensor, maps: dict[AxisKey, torch.Tensor] | None = None
) -> None:
    """Apply one group's permutation in place of the dict's entries (tensors are replaced).
    With ``maps`` (composed index map per axis, as ``index_maps`` returns) the maps follow."""
    for m in group.members:
        t = state_dict[m.tensor]
        idx = expand(p.cpu(), m, t.shape[m.axis])
        state_dict[m.tensor] = t.index_select(m.axis, idx.to(t.device))
        if maps is not None:
            key = (m.tensor, m.axis)
            maps[key] = maps[key][idx] if key in maps else idx


def member_blocks(t: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """The member's slice of ``t`` as ``(size, block, *other axes)``: row i is neuron i's part."""
    x = t.narrow(member.axis, member.offset, size * member.block).movedim(member.axis, 0)
    return x.reshape(size, member.block, *x.shape[1:])


def member_rows(t: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """The member's slice of ``t`` as ``size x D`` rows: row i is neuron i's part of this tensor."""
    return t.narrow(member.axis, member.offset, size * member.block).movedim(member.axis, 0).reshape(size, -1)


def random_permutations(
    spec: Spec, groups: Iterable[str] | None = None, *, seed: int | None = None, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A uniformly random permutation for each named group (all groups when ``groups`` is None)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    names = spec.names if groups is None else list(groups)
    out = {}
    for n in names:
        g = spec.group(n)
        out[n] = torch.randperm(g.size, generator=generator)
    return out


def undo_permutations(spec: Spec, maps: Mapping[AxisKey, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-group permutations, in spec order, whose composition undoes the composed maps ``maps``.

    ``maps[(tensor, axis)]`` says which original index sits at each position. Each group's
    permutation is read off its first member's map after the earlier groups were applied, so
    nested groups come out right: an inner group's recovery depends on where the outer group
    put its block.
    """
    cur = {k: v.clone() for k, v in maps.items()}
    out: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        m = next((m for m in g.members if (m.tensor, m.axis) in cur), None)
        if m is None:
            out[g.name] = torch.arange(g.size)
            continue
        c = cur[(m.tensor, m.axis)]
        starts = c[m.offset + torch.arange(g.size) * m.block]  # source index now at each slot
        src = torch.div(starts - m.offset, m.block, rounding_mode="floor")  # source element per slot
        p = torch.argsort(src)
        out[g.name] = p
        for mm in g.members:
            key = (mm.tensor, mm.axis)
            if key in cur:
                cur[key] = cur[key][expand(p, mm, cur[key].numel())]
    return out


def recovering_permutations(spec: Spec, attack: Perms, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The exact recovery (truth) of an attack, per group: ``argsort(q)`` without nesting."""
    return undo_permutations(spec, index_maps(spec, attack, shapes))


def compose_permutations(spec: Spec, maps: Mapping[AxisKey, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-group permutations, in spec order, whose composition equals ``maps``."""
    return undo_permutations(spec, {k: torch.argsort(v) for k, v in maps.items()})


def psi(spec: Spec, truth: Perms, recovered: Perms) -> tuple[dict[str, float], float]:
    """Re-synchronization success rate: per group ``100*mean(p == p_true)`` and the
    neuron-weighted mean over the groups present in ``truth``."""
    per: dict[str, float] = {}
    hit = total = 0
    for g in spec.groups:
        if g.name not in truth:
            continue
        t = torch.as_tensor(truth[g.name]).cpu()
        r = torch.as_tensor(recovered.get(g.name, torch.arange(g.size))).cpu()
        ok = int((t == r).sum())
        per[g.name] = 100.0 * ok / g.size
        hit += ok
        total += g.size
    return per, (100.0 * hit / total if total else 100.0)


def psi_composed(spec: Spec, attack: Perms, recovered: Perms, shapes: Mapping[str, torch.Size]) -> float:
    """Psi over composed index maps: position i of a (tensor, axis) is recovered when ``a[r[i]] == i``."""
    a = index_maps(spec, attack, shapes)
    r = index_maps(spec, recovered, shapes)
    ok = total = 0
    for key, amap in a.items():
        rmap = r.get(key, torch.arange(amap.numel()))
        comp = amap[rmap]
        moved = amap != torch.arange(amap.numel())
        ok += int((comp == torch.arange(amap.numel()))[moved].sum())
        total += int(moved.sum())
    return 100.0 * ok / total if total else 100.0
