"""Trace a model with ``torch.export`` and turn its axis classes into spec groups."""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from findlady_core.derive import rules, rules_shape  # noqa: F401  (register the op rules)
from findlady_core.derive.graph import SizeError, Walker
from findlady_core.errors import SpecError
from findlady_core.spec import Group, Member

OUTPUT = "\0output"  # pseudo tensor names of the model's outputs, for the self-check only


@dataclass
class Derived:
    groups: list[Group]
    warnings: list[str]
    output_members: dict[str, list[Member]] = field(default_factory=dict)  # group -> members on outputs
    float32_inside: bool = False  # some value is computed in float32 (a norm upcast)


def export(model: nn.Module, inputs: Mapping[str, Any]) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(model, (), dict(inputs), strict=False)
    except Exception as e:  # the class cannot be traced as configured: say which and why
        raise SpecError(f"cannot trace {type(model).__name__}: {type(e).__name__}: {str(e)[:300]}") from None


def derive(model: nn.Module, inputs: Mapping[str, Any], names: Mapping[str, list[str]], *, pin_outputs: bool) -> Derived:
    """The groups of ``model`` traced on ``inputs``; tensors named as ``names`` maps them."""
    ep = export(model, inputs)
    w = Walker(ep, storable=lambda fqn: bool(names.get(fqn)))
    try:
        w.run(pin_outputs=pin_outputs)
    except SizeError as e:
        raise SpecError(f"cannot derive a spec for {type(model).__name__}: {e}") from None
    d = assemble(w, names)
    d.float32_inside = any(
        isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.float32 for n in ep.graph.nodes
    )
    return d


def _name(label: str) -> str:
    s = re.sub(r"\.(weight|bias):\d+", "", label)
    return s.replace(":", ".axis")


def assemble(w: Walker, names: Mapping[str, list[str]]) -> Derived:
    ax = w.axes
    edges: set[tuple[int, int]] = set()
    members: dict[int, list[Member]] = {}
    reasons: dict[str, list[str]] = {}
    for fqn, use in w.params.items():
        stored = names.get(fqn) or []
        if not use.used or not use.floating or not stored:
            continue  # unused, integer or never stored: pinned, nothing to move
        for d, a in enumerate(use.axes):
            if use.shape[d] < 2:
                continue
            role = w.roles.get((fqn, d))
            role = None if role == ("out" if d == 0 else "in") else role
            for leaf, off, blk in ax.leaves(a, 0, 1, edges):
                if ax.size[leaf] < 2:
                    continue
                lst = members.setdefault(leaf, [])
                for t in stored:
                    m = Member(t, d, off, blk, role)
                    if all((x.tensor, x.axis, x.offset, x.block) != (t, d, off, blk) for x in lst):
                        lst.append(m)
            if (fqn, d) not in w.roles:
                continue  # not a feature axis (a sequence, a kernel position): pinning it is no news
            for _, why in ax.pin_reasons(a):
                ex = reasons.setdefault(why, [])
                if f"{stored[0]} axis {d}" not in ex:
                    ex.append(f"{stored[0]} axis {d}")
    order = _topological(list(members), edges)
    groups, taken = [], {}
    group_of: dict[int, str] = {}
    for leaf in order:
        base = _name(ax.label[leaf])
        taken[base] = taken.get(base, 0) + 1
        name = base if taken[base] == 1 else f"{base}#{taken[base]}"
        group_of[leaf] = name
        groups.append(Group(name, ax.size[leaf], tuple(members[leaf])))
    warnings = [f"pinned, {why}: {len(ex)} tensor axes, e.g. {', '.join(ex[:3])}" for why, ex in reasons.items()]
    if w.unknown:
        ops = ", ".join(f"{k} ({v}x)" for k, v in sorted(w.unknown.items()))
        warnings.append(f"ops without an exact rule pinned the axes they touch: {ops}")
    outs: dict[str, list[Member]] = {}
    for k, lay in enumerate(w.outputs):
        for d, e in enumerate(lay):
            if isinstance(e, int):
                for leaf, off, blk in ax.leaves(e):
                    if leaf in group_of:
                        outs.setdefault(group_of[leaf], []).append(Member(f"{OUTPUT}{k}", d, off, blk))
    return Derived(groups, warnings, outs)


def _topological(nodes: list[int], edges: set[tuple[int, int]]) -> list[int]:
    """Nodes in first-seen order, except that an outer group comes before the groups nested in it."""
    rank = {n: i for i, n in enumerate(nodes)}
    indeg = {n: 0 for n in nodes}
    succ: dict[int, list[int]] = {n: [] for n in nodes}
    for a, b in edges:
        if a in rank and b in rank and a != b:
            succ[a].append(b)
            indeg[b] += 1
    heap = [(rank[n], n) for n in nodes if indeg[n] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, n = heapq.heappop(heap)
        out.append(n)
        for m in succ[n]:
            indeg[m] -= 1
            if indeg[m] == 0:
                heapq.heappush(heap, (rank[m], m))
    if len(out) != len(nodes):
        raise SpecError("derived groups nest in a cycle: the architecture's structure is not understood")
    return out
