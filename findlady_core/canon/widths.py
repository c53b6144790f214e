"""Suspects of another width: split neurons merged, dummy neurons dropped, the rest matched.

NeuronSplit (Yan et al., USENIX Security 2023) copies a neuron's incoming parameters and
splits its outgoing weights into ``a`` and ``w - a``; NeuronClique adds neurons with equal
incoming parameters whose outgoing weights sum to zero. Both keep the function and change the
width of a layer, which a permutation-only check cannot take. Undone here, per *width group*
(a group that owns every axis it sits on, see ``width_groups``), from the suspect alone:

1. **merge** neurons whose own parameters (incoming weights, bias, BatchNorm parameters and
   statistics) are equal up to a positive factor ``c`` (cosine at least ``MERGE_COSINE``),
   adding ``c`` times their outgoing weights to the first one's: exact for equal copies under
   any activation, and for ``c != 1`` under a positively homogeneous one (ReLU, LeakyReLU),
   the same assumption the rescale check of ``findlady_core.integrity`` makes;
2. **drop** neurons whose outgoing weights are zero (relative to the group's typical neuron):
   they contribute nothing, whatever their activation;
3. where the suspect is still **wider**, the reference is padded with zero neurons and the
   solver's assignment picks, per group, the suspect neurons matched to real reference
   neurons; the rest are dropped as a *real* change (they carry weight, so the suspect is not
   the reference's function); where it is **narrower**, zero neurons are appended (a real
   change too: integrity flags them).

Merges and function-preserving drops use no reference, so they cannot make an unrelated model
look like the reference.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from findlady_core.spec import Group, Member, Spec, is_statistic

MERGE_COSINE = 1 - 1e-5
"""Own-parameter cosine from which two neurons are one neuron split in two (float32 copies
reach 1 - 1e-7; distinct trained neurons stay far below)."""
DROP_RELATIVE = 1e-5
"""Outgoing norm, relative to the group's median, below which a neuron contributes nothing."""
MAX_WIDTH_RATIO = 2
"""A suspect's width group may be at most this many times wider or narrower than the reference's."""

_NORM = re.compile(r"(norm|(^|[._])ln(_|\.|\d|$))", re.IGNORECASE)


def _module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else ""


def width_groups(spec: Spec, shapes: Mapping[str, Any] | None = None) -> list[Group]:
    """Groups whose width may change without changing the function: the group has consumers
    (``in`` members) and own parameters, owns every axis it sits on (no other group there, no
    offset, and with ``shapes`` the whole axis), and touches no LayerNorm-like parameter (a
    norm across the group's neurons would see the new width); BatchNorm, per channel, is fine."""
    count = Counter((m.tensor, m.axis) for g in spec.groups for m in g.members)
    out = []
    for g in spec.groups:
        if not g.in_members or not g.out_members:
            continue
        if any(count[(m.tensor, m.axis)] > 1 or m.offset for m in g.members):
            continue
        if shapes is not None and any(_shape(shapes, m.tensor)[m.axis] != g.size * m.block for m in g.members):
            continue
        has_bn = any(is_statistic(m.tensor) for m in g.members)
        if not has_bn and any(_NORM.search(_module(m.tensor)) for m in g.members):
            continue
        out.append(g)
    return out


def _shape(shapes: Mapping[str, Any], name: str) -> list[int]:
    v = shapes[name]  # a tensor, a torch.Size, or compat's [shape, dtype] pair
    if isinstance(v, torch.Tensor):
        return list(v.shape)
    if isinstance(v, torch.Size):
        return list(v)
    return list(v[0])


def suspect_widths(spec: Spec, ref_shapes: Mapping[str, Any], sus_shapes: Mapping[str, Any]) -> dict[str, int]:
    """Width of every width group in the suspect whose width differs, checked: each member's
    axis a whole number of blocks, the members agreeing, within ``MAX_WIDTH_RATIO``. Raises
    ``ValueError`` with a sentence naming the tensor when a shape does not fit."""
    out: dict[str, int] = {}
    for g in width_groups(spec, ref_shapes):
        widths: set[int] = set()
        seen: dict[int, str] = {}
        for m in g.members:
            if m.tensor not in sus_shapes:
                continue
            length = _shape(sus_shapes, m.tensor)[m.axis] if m.axis < len(_shape(sus_shapes, m.tensor)) else -1
            if length < 0 or length % m.block:
                raise ValueError(f"tensor {m.tensor!r} axis {m.axis} has length {length}, not a multiple of {m.block}")
            widths.add(length // m.block)
            seen.setdefault(length // m.block, m.tensor)
        if len(widths) > 1:
            told = ", ".join(f"{seen[w]!r} gives {w}" for w in sorted(widths))
            raise ValueError(f"the tensors of group {g.name!r} disagree on its width in the suspect: {told}")
        n = widths.pop() if widths else g.size
        if n != g.size:
            if not g.size / MAX_WIDTH_RATIO <= n <= g.size * MAX_WIDTH_RATIO:
                raise ValueError(
                    f"group {g.name!r} has {n} neurons in the suspect, the reference {g.size}: more than {MAX_WIDTH_RATIO}x apart"
                )
            out[g.name] = n
    return out


def width_axes(spec: Spec, ref_shapes: Mapping[str, Any]) -> set[tuple[str, int]]:
    """The (tensor, axis) pairs whose length may differ in a suspect."""
    return {(m.tensor, m.axis) for g in width_groups(spec, ref_shapes) for m in g.members}


# ---------------------------------------------------------------------------------------------
# one group, one model: merge and drop


def _blocks(t: torch.Tensor, m: Member, n: int) -> torch.Tensor:
    """(n, block, *other axes) view of one member (offset 0, whole axis)."""
    x = t.movedim(m.axis, 0)
    return x.reshape(n, m.block, *x.shape[1:])


def _unblocks(x: torch.Tensor, m: Member) -> torch.Tensor:
    return x.reshape(x.shape[0] * m.block, *x.shape[2:]).movedim(0, m.axis).contiguous()


def _vectors(sd: Mapping[str, torch.Tensor], members: Iterable[Member], n: int) -> torch.Tensor:
    parts = [_blocks(sd[m.tensor], m, n).reshape(n, -1).double() for m in members]
    return torch.cat(parts, 1) if parts else torch.zeros(n, 0, dtype=torch.float64)


def _clusters(own: torch.Tensor) -> list[list[int]]:
    """Groups of neurons whose own vectors are positively proportional (cosine >= MERGE_COSINE)."""
    n = own.shape[0]
    norm = own.norm(dim=1)
    unit = own / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for lo in range(0, n, 1024):  # row blocks: an n x n matrix at once would not fit wide layers
        cos = unit[lo:lo + 1024] @ unit.T
        rows, cols = torch.nonzero(cos >= MERGE_COSINE, as_tuple=True)
        for i, j in zip((rows + lo).tolist(), cols.tolist()):
            if i < j and norm[i] > 0 and norm[j] > 0:
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [sorted(c) for c in groups.values() if len(c) > 1]


def _spread(own: torch.Tensor, c: list[int]) -> float:
    """Largest angle-like gap (1 - cosine) between a cluster's first neuron and the others."""
    h = own[c[0]] / own[c[0]].norm()
    return max(1.0 - float(own[j] @ h / own[j].norm()) for j in c[1:])


@dataclass
class GroupCanon:
    """One group after merging and dropping: ``kept[k]`` is the original position of neuron k."""

    kept: list[int]
    transforms: list[dict[str, Any]] = field(default_factory=list)


def merge_and_drop(sd: dict[str, torch.Tensor], g: Group, n: int, *, keep_at_least: int = 2,
                   target: int | None = None) -> GroupCanon:
    """Merge split copies and drop silent neurons of group ``g`` (``n`` neurons now) in place.

    With ``target`` (the reference's width) silent neurons are dropped only while the group is
    wider than that, most silent first: in a suspect of the reference's width a silent neuron
    is the reference's neuron with its outgoing weights pruned, and it keeps its place."""
    own_members = g.out_members
    in_members = [m for m in g.in_members if not is_statistic(m.tensor)]
    own = _vectors(sd, own_members, n)
    clusters = _clusters(own)
    factors = torch.ones(n, dtype=torch.float64)
    removed: set[int] = set()
    transforms: list[dict[str, Any]] = []
    ins = {m.tensor: _blocks(sd[m.tensor], m, n).double().clone() for m in in_members}
    if target is not None:  # never below the reference's width: tightest clusters first, while wider
        budget = n - target
        chosen = []
        for c in sorted(clusters, key=lambda c: _spread(own, c)):
            if len(c) - 1 <= budget:
                chosen.append(c)
                budget -= len(c) - 1
        clusters = sorted(chosen)
    for c in clusters:
        head = c[0]
        rr = float(own[head] @ own[head])
        for j in c[1:]:
            f = float(own[j] @ own[head]) / rr
            factors[j] = f
            for m in in_members:
                ins[m.tensor][head] += f * ins[m.tensor][j]
            removed.add(j)
        rel = max(float((own[j] - factors[j] * own[head]).norm() / own[head].norm()) for j in c[1:])
        transforms.append({"kind": "merge", "group": g.name, "neurons": c, "factors": [float(factors[j]) for j in c],
                           "residual": rel, "function_preserving": True})
    out_norm = torch.zeros(n, dtype=torch.float64)
    for x in ins.values():
        out_norm += x.reshape(n, -1).square().sum(1)
    out_norm = out_norm.sqrt()
    alive = [i for i in range(n) if i not in removed]
    typical = float(out_norm[alive].median()) if alive else 0.0
    silent = sorted((i for i in alive if out_norm[i] <= DROP_RELATIVE * typical), key=lambda i: float(out_norm[i]))
    if target is not None:
        silent = sorted(silent[: max(0, len(alive) - target)])
    if len(alive) - len(silent) < keep_at_least:
        silent = []  # a group with (almost) nothing left is not a dummy layer: leave it to the checks
    if silent:
        transforms.append({"kind": "drop", "group": g.name, "neurons": silent,
                           "residual": max(float(out_norm[i]) / typical for i in silent) if typical else 0.0,
                           "function_preserving": True})
    kept = [i for i in alive if i not in set(silent)]
    if len(kept) == n:
        return GroupCanon(kept, transforms)
    idx = torch.tensor(kept, dtype=torch.int64)
    for m in own_members:
        sd[m.tensor] = _unblocks(_blocks(sd[m.tensor], m, n).index_select(0, idx.to(sd[m.tensor].device)), m)
    for m in in_members:
        t = sd[m.tensor]
        sd[m.tensor] = _unblocks(ins[m.tensor].index_select(0, idx).to(t.dtype).to(t.device), m)
    for m in g.in_members:
        if is_statistic(m.tensor):  # an in-role statistic has no sum: just keep the kept neurons
            sd[m.tensor] = _unblocks(_blocks(sd[m.tensor], m, n).index_select(0, idx), m)
    return GroupCanon(kept, transforms)


def resize(sd: Mapping[str, torch.Tensor], g: Group, n: int, index: list[int]) -> dict[str, torch.Tensor]:
    """Group ``g`` (``n`` neurons now) reduced or extended to the neurons ``index`` (``-1``: a
    zero neuron) on every member."""
    out = dict(sd)
    idx = torch.tensor([max(i, 0) for i in index], dtype=torch.int64)
    zero = torch.tensor([i < 0 for i in index])
    for m in g.members:
        x = _blocks(sd[m.tensor], m, n).index_select(0, idx.to(sd[m.tensor].device))
        if bool(zero.any()):
            x = x.clone()
            x[zero.to(x.device)] = 0
        out[m.tensor] = _unblocks(x, m)
    return out


def resized_spec(spec: Spec, sizes: Mapping[str, int]) -> Spec:
    """The spec with the named groups' sizes replaced (width groups only: no offsets to move)."""
    groups = tuple(Group(g.name, sizes.get(g.name, g.size), g.members) for g in spec.groups)
    return Spec(groups, spec.meta)
