"""Axis ids joined with a union-find, with the structure an axis acquires from the graph.

Every dimension of every value in a traced graph is described by one *axis id*. Two ids are
joined when the same permutation must act on both (a linear layer's input and the tensor it
reads, a residual add's operands). An axis may also be *refined*, which restricts its symmetry:

- ``cat``: the axis is pieces laid end to end (a fused q|k|v projection sliced apart, rotary
  halves); a permutation may only act inside each piece.
- ``prod``: the axis is ``outer`` items of ``len(kids[0])`` elements each (a head split); a
  permutation moves whole items (the heads) and permutes inside item ``i`` with ``kids[i]``
  (the dims inside one head). Refining an outer axis again gives grouped-query attention: kv
  heads, then query heads inside each kv group.

A *pinned* axis takes no permutation at all (a model input or output, a vocabulary, an axis an
op mixes in a way we do not understand exactly). Joining an axis to a pinned one pins it.
``leaves`` turns an axis into the spec's members: one (leaf, offset, block) per unpinned leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Refine:
    kind: str  # "cat" or "prod"
    parts: list[int]  # cat: the pieces in order; prod: [outer, kid_0, kid_1, ...]


@dataclass
class Axes:
    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    pinned: list[bool] = field(default_factory=list)
    reasons: dict[int, list[str]] = field(default_factory=dict)  # root -> why it was pinned
    refine: dict[int, Refine] = field(default_factory=dict)  # root -> its structure

    def new(self, size: int, label: str, pinned: bool = False) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.label.append(label)
        self.pinned.append(pinned)
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def is_pinned(self, i: int) -> bool:
        return self.pinned[self.find(i)]

    def live(self, i: int) -> bool:
        """True when some element of the axis may still be permuted."""
        r = self.find(i)
        if self.pinned[r]:
            return False
        ref = self.refine.get(r)
        return ref is None or any(self.live(p) for p in ref.parts)

    def pin(self, i: int, why: str | None = None) -> None:
        r = self.find(i)
        if why:
            self.reasons.setdefault(r, [])
            if why not in self.reasons[r]:
                self.reasons[r].append(why)
        if self.pinned[r]:
            return
        self.pinned[r] = True
        ref = self.refine.get(r)
        if ref is not None:
            for p in ref.parts:
                self.pin(p, why)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.pin(ra, "joined with an axis of another size")
            self.pin(rb, "joined with an axis of another size")
            return
        root, other = min(ra, rb), max(ra, rb)  # the earlier id keeps its (earlier) label
        self.parent[other] = root
        pinned = self.pinned[root] or self.pinned[other]
        self.pinned[root] = False
        if other in self.reasons:
            self.reasons.setdefault(root, []).extend(w for w in self.reasons.pop(other) if w not in self.reasons[root])
        ref_a, ref_b = self.refine.pop(root, None), self.refine.pop(other, None)
        if ref_a is not None or ref_b is not None:
            self.refine[root] = ref_a or ref_b  # type: ignore[assignment]
        if ref_a is not None and ref_b is not None:
            sizes_a = [self.size[self.find(p)] for p in ref_a.parts]
            sizes_b = [self.size[self.find(p)] for p in ref_b.parts]
            if ref_a.kind == ref_b.kind and sizes_a == sizes_b:
                for p, q in zip(ref_a.parts, ref_b.parts):
                    self.union(p, q)
            else:
                # two different structures on one axis: a common refinement exists, but the
                # simple and safe answer is no permutation on it at all
                for p in ref_a.parts + ref_b.parts:
                    self.pin(p, "two incompatible structures (slices, head splits) on one axis")
                pinned = True
        if pinned:
            self.pinned[root] = False
            self.pin(root)

    def split(self, a: int, outer: int) -> tuple[int, list[int]] | None:
        """Refine ``a`` as ``outer`` items (a prod); its outer axis and kids, or None when
        ``a`` already has another structure."""
        r = self.find(a)
        n = self.size[r]
        if outer < 1 or n % outer:
            return None
        ref = self.refine.get(r)
        if ref is not None:
            if ref.kind == "prod" and self.size[self.find(ref.parts[0])] == outer:
                return ref.parts[0], ref.parts[1:]
            return None
        lab = self.label[r]
        o = self.new(outer, f"{lab}.heads")
        kids = [self.new(n // outer, f"{lab}.head{i}") for i in range(outer)]
        self.refine[r] = Refine("prod", [o, *kids])
        if self.pinned[r]:
            for p in [o, *kids]:
                self.pin(p)
        return o, kids

    def cut(self, a: int, lo: int, hi: int) -> list[int] | None:
        """Axis ids covering elements ``[lo, hi)`` of ``a``, refining ``a`` into slices as needed;
        None when the range cuts through the items of a prod (not expressible exactly)."""
        r = self.find(a)
        n = self.size[r]
        if lo <= 0 and hi >= n:
            return [r]
        ref = self.refine.get(r)
        if ref is None:
            bounds = sorted({0, lo, hi, n})
            # labelled by index, not by bounds: a shrunk copy of the model gets the same names
            pieces = [self.new(e - s, f"{self.label[r]}.part{j}", self.pinned[r]) for j, (s, e) in enumerate(zip(bounds, bounds[1:]))]
            self.refine[r] = Refine("cat", pieces)
            return [pieces[bounds.index(lo)]]
        if ref.kind == "cat":
            out: list[int] = []
            start = 0
            for p in ref.parts:
                size = self.size[self.find(p)]
                s, e = max(lo, start), min(hi, start + size)
                if s < e:
                    got = self.cut(p, s - start, e - start)
                    if got is None:
                        return None
                    out += got
                start += size
            return out
        outer, kids = ref.parts[0], ref.parts[1:]
        k = self.size[self.find(kids[0])]
        if lo % k or hi % k:
            return None
        outs = self.cut(outer, lo // k, hi // k)
        if outs is None or len(outs) != 1:
            return None
        m = self.new(hi - lo, f"{self.label[r]}.slice")
        self.refine[m] = Refine("prod", [outs[0], *kids[lo // k : hi // k]])
        return [m]

    def joined(self, kind: str, parts: list[int], label: str) -> int:
        """A new axis made of ``parts`` (a cat of pieces, or a prod [outer, kids...])."""
        if kind == "cat":
            size = sum(self.size[self.find(p)] for p in parts)
        else:
            size = self.size[self.find(parts[0])] * self.size[self.find(parts[1])]
        m = self.new(size, label)
        self.refine[m] = Refine(kind, list(parts))
        return m

    def leaves(self, a: int, offset: int = 0, block: int = 1, edges: set[tuple[int, int]] | None = None) -> list[tuple[int, int, int]]:
        """(leaf root, offset, block) of every unpinned leaf of ``a``, in element order.

        ``edges`` collects (outer leaf, inner leaf) pairs: a group nested inside another's
        blocks must come after it in the spec.
        """
        r = self.find(a)
        ref = self.refine.get(r)
        if ref is None:
            return [] if self.pinned[r] else [(r, offset, block)]
        out: list[tuple[int, int, int]] = []
        if ref.kind == "cat":
            for p in ref.parts:
                out += self.leaves(p, offset, block, edges)
                offset += self.size[self.find(p)] * block
            return out
        outer, kids = ref.parts[0], ref.parts[1:]
        k = self.size[self.find(kids[0])]
        outs = self.leaves(outer, offset, block * k, edges)
        inner: list[tuple[int, int, int]] = []
        for i, kid in enumerate(kids):
            inner += self.leaves(kid, offset + i * k * block, block, edges)
        if edges is not None:
            for o in outs:
                for x in inner:
                    edges.add((o[0], x[0]))
        return outs + inner

    def pin_reasons(self, a: int) -> list[tuple[int, str]]:
        """(leaf root, reason) of the pinned leaves of ``a`` that were pinned with a reason."""
        r = self.find(a)
        ref = self.refine.get(r)
        if ref is None:
            return [(r, w) for w in self.reasons.get(r, [])] if self.pinned[r] else []
        out = [(r, w) for w in self.reasons.get(r, [])]
        for p in ref.parts:
            out += self.pin_reasons(p)
        return out
