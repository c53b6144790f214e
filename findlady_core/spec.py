"""Permutation specs (``findlady.spec/1``): which tensor axes share one permutation.

A spec is plain data, safe to accept from users. ``validate`` checks it against a state dict
and names the tensor and axis of every problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from findlady_core.errors import SpecError

FORMAT = "findlady.spec/1"
MAX_GROUPS = 100_000
MAX_MEMBERS = 1_000_000
MAX_SIZE = 1 << 24
SOURCES = ("traced", "config", "catalog", "chain", "user")
MAX_WARNINGS = 1000


STATISTICS = ("running_mean", "running_var")


def is_statistic(name: str) -> bool:
    """BatchNorm running statistics: estimates of activations, not weights."""
    return name.rsplit(".", 1)[-1] in STATISTICS


@dataclass(frozen=True)
class Member:
    """One tensor axis of a group: element i is ``[offset + i*block, offset + (i+1)*block)``."""

    tensor: str
    axis: int
    offset: int = 0
    block: int = 1
    role: str | None = None

    @property
    def is_out(self) -> bool:
        """True for the neuron's own parameters (default: axis 0, which covers 1-D tensors)."""
        if self.role is not None:
            return self.role == "out"
        return self.axis == 0

    def span(self, size: int) -> tuple[int, int]:
        return self.offset, self.offset + size * self.block

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tensor": self.tensor, "axis": self.axis}
        if self.offset:
            d["offset"] = self.offset
        if self.block != 1:
            d["block"] = self.block
        if self.role is not None:
            d["role"] = self.role
        return d


@dataclass(frozen=True)
class Group:
    """Neurons that move together: ``size`` elements, the same permutation on every member."""

    name: str
    size: int
    members: tuple[Member, ...]

    @property
    def out_members(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.is_out)

    @property
    def own_members(self) -> tuple[Member, ...]:
        """The neuron's own weights: its ``out`` slices except BatchNorm running statistics
        (what attacks perturb and what integrity compares as the neuron's parameters)."""
        return tuple(m for m in self.out_members if not is_statistic(m.tensor))

    @property
    def in_members(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if not m.is_out)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "members": [m.to_dict() for m in self.members]}


@dataclass(frozen=True)
class Spec:
    """An ordered list of groups; nested groups apply in this order."""

    groups: tuple[Group, ...]
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: str | None = field(default=None, compare=False)  # where the spec came from (SOURCES)
    warnings: tuple[str, ...] = field(default=(), compare=False)  # axes pinned and why

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise SpecError(f"duplicate group names: {', '.join(dup[:5])}")

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise SpecError(f"spec has no group named {name!r}")

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def tensors(self) -> set[str]:
        return {m.tensor for g in self.groups for m in g.members}

    @property
    def neurons(self) -> int:
        return sum(g.size for g in self.groups)

    def select(self, names: list[str] | None) -> Spec:
        """The sub-spec of the named groups (all when ``names`` is None), in spec order."""
        if names is None:
            return self
        for n in names:
            self.group(n)
        keep = set(names)
        return Spec(tuple(g for g in self.groups if g.name in keep), self.meta, self.source, self.warnings)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "groups": [g.to_dict() for g in self.groups]}
        if self.source is not None:
            d["source"] = self.source
        if self.warnings:
            d["warnings"] = list(self.warnings)
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: Any) -> Spec:
        return _parse(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Spec:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None
        except RecursionError:
            raise SpecError("spec JSON is nested too deeply") from None
        return _parse(data)

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        try:
            text = Path(path).read_bytes()
        except OSError as e:
            raise SpecError(f"cannot read spec {path}: {e.strerror}") from None
        return cls.from_json(text)

    def validate(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        validate(self, state_dict)


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"{what} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise SpecError(f"{what} must be in [{lo}, {hi}], got {v}")
    return v


def _parse(data: Any) -> Spec:
    if not isinstance(data, dict):
        raise SpecError("spec must be a JSON object")
    if data.get("format") != FORMAT:
        raise SpecError(f"spec format must be {FORMAT!r}, got {data.get('format')!r}")
    groups_in = data.get("groups")
    if not isinstance(groups_in, list) or not groups_in:
        raise SpecError("spec needs a non-empty list 'groups'")
    if len(groups_in) > MAX_GROUPS:
        raise SpecError(f"spec has {len(groups_in)} groups, more than {MAX_GROUPS}")
    n_members = 0
    groups = []
    for gi, g in enumerate(groups_in):
        where = f"groups[{gi}]"
        if not isinstance(g, dict):
            raise SpecError(f"{where} must be an object")
        name = g.get("name")
        if not isinstance(name, str) or not name or len(name) > 512:
            raise SpecError(f"{where}.name must be a non-empty string of at most 512 characters")
        where = f"group {name!r}"
        size = _int(g.get("size"), f"{where}: size", 1, MAX_SIZE)
        members_in = g.get("members")
        if not isinstance(members_in, list) or not members_in:
            raise SpecError(f"{where}: needs a non-empty list 'members'")
        n_members += len(members_in)
        if n_members > MAX_MEMBERS:
            raise SpecError(f"spec has more than {MAX_MEMBERS} members")
        members = []
        for mi, m in enumerate(members_in):
            mw = f"{where} member {mi}"
            if not isinstance(m, dict):
                raise SpecError(f"{mw} must be an object")
            unknown = set(m) - {"tensor", "axis", "offset", "block", "role"}
            if unknown:
                raise SpecError(f"{mw}: unknown fields {sorted(unknown)}")
            tensor = m.get("tensor")
            if not isinstance(tensor, str) or not tensor or len(tensor) > 1024:
                raise SpecError(f"{mw}: 'tensor' must be a non-empty string")
            mw = f"{where} member {tensor!r}"
            axis = _int(m.get("axis"), f"{mw}: axis", 0, 64)
            offset = _int(m.get("offset", 0), f"{mw}: offset", 0, 1 << 40)
            block = _int(m.get("block", 1), f"{mw}: block", 1, 1 << 40)
            role = m.get("role")
            if role not in (None, "in", "out"):
                raise SpecError(f"{mw}: role must be 'in' or 'out', got {role!r}")
            members.append(Member(tensor, axis, offset, block, role))
        # One tensor axis may appear several times with disjoint ranges: the q, k and v parts
        # of a fused projection, or the query heads of one kv group, take the same permutation.
        spans = sorted((m.tensor, m.axis, m.offset, m.offset + size * m.block) for m in members)
        for a, b in zip(spans, spans[1:]):
            if a[:2] == b[:2] and b[2] < a[3]:
                raise SpecError(f"{where}: tensor {a[0]!r} axis {a[1]} is listed twice with overlapping ranges")
        groups.append(Group(name, size, tuple(members)))
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise SpecError("spec 'meta' must be an object")
    source = data.get("source")
    if source is not None and source not in SOURCES:
        raise SpecError(f"spec 'source' must be one of {', '.join(SOURCES)}, got {str(source)[:40]!r}")
    warns = data.get("warnings", [])
    if not isinstance(warns, list) or len(warns) > MAX_WARNINGS or not all(isinstance(w, str) and len(w) <= 4000 for w in warns):
        raise SpecError(f"spec 'warnings' must be a list of at most {MAX_WARNINGS} strings of at most 4000 characters")
    return Spec(tuple(groups), meta, source, tuple(warns))


def validate(spec: Spec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Check that every member fits ``state_dict`` and that no two groups overlap badly.

    Raises ``SpecError`` naming the group, tensor and axis.
    """
    # (tensor, axis) -> list of (lo, hi, block, group name) of earlier groups
    claims: dict[tuple[str, int], list[tuple[int, int, int, str]]] = {}
    for g in spec.groups:
        for m in g.members:
            t = state_dict.get(m.tensor)
            where = f"group {g.name!r}: tensor {m.tensor!r} axis {m.axis}"
            if t is None:
                raise SpecError(f"group {g.name!r}: tensor {m.tensor!r} is not in the weights")
            if not t.is_floating_point():
                raise SpecError(f"group {g.name!r}: tensor {m.tensor!r} is {t.dtype}, not floating point")
            if m.axis >= t.dim():
                raise SpecError(f"{where}: the tensor has only {t.dim()} axes (shape {tuple(t.shape)})")
            lo, hi = m.span(g.size)
            if hi > t.shape[m.axis]:
                raise SpecError(
                    f"{where}: needs offset + size*block = {lo} + {g.size}*{m.block} = {hi} "
                    f"but the axis has length {t.shape[m.axis]}"
                )
            for (plo, phi, pblock, pname) in claims.get((m.tensor, m.axis), []):
                if hi <= plo or lo >= phi:
                    continue  # disjoint
                inside_one_block = plo <= lo and hi <= phi and (lo - plo) // pblock == (hi - 1 - plo) // pblock
                if not inside_one_block or pname == g.name:
                    raise SpecError(
                        f"{where}: range [{lo}, {hi}) overlaps group {pname!r} range [{plo}, {phi}) "
                        "without lying inside one of its blocks"
                    )
            claims.setdefault((m.tensor, m.axis), []).append((lo, hi, m.block, g.name))


def load_spec(path: str | Path) -> Spec:
    return Spec.load(path)
