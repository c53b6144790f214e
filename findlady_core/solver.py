"""The whole-model solver behind ``resync``: layout, features, assignment, and the solver
class (the steps are described in ``findlady_core.resync``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from findlady_core.assignment import _assign, _Stats, _stats, margins
from findlady_core.features import CHUNK_ELEMS, Sketch, chunks, sketch_width, streamed_cosines
from findlady_core.lazy import OnDevice
from findlady_core.permute import AxisKey, compose_permutations, expand, member_blocks, member_rows
from findlady_core.spec import Group, Member, Spec

STRONG_EVIDENCE = 4096
"""Aligned feature values per neuron above which a first solve skips invariant summaries."""

SKETCH_MIN_NEURONS = 1024
"""Below this the exact product costs about what folding a sketch does: folding reads each
feature of N neurons through a few passes of about 1 ns per value, the product costs 2N flops
per value at about 70 GFLOP/s (BERT-base's residual stream, 768 wide: 3.2 s sketched, 2.3 s
exact; its MLPs, 3072 wide: 2.3 s sketched, 5.4 s exact; one thread)."""
CONFIRM_SIGMAS = 9.0
"""A sketched solve is redone on exact features when a neuron's exact matched similarity is
not this many standard deviations of the sketch's error above its best sketched alternative
(a union bound over 10^8 entries asks for about 8 of them, on the error's upper bound).
"""

# ---------------------------------------------------------------------------------------------
# layout: which groups touch which axes


@dataclass
class _Layout:
    spec: Spec
    shapes: Mapping[str, torch.Size]
    axis_groups: dict[AxisKey, list[str]]
    inner: dict[tuple[str, str, int], list[str]]  # (group, tensor, axis) -> groups nested in its blocks
    outer: dict[str, set[str]]  # group -> groups it is nested in
    neighbours: dict[str, set[str]]

    @classmethod
    def build(cls, spec: Spec, shapes: Mapping[str, torch.Size]) -> _Layout:
        axis_groups: dict[AxisKey, list[str]] = {}
        spans: dict[AxisKey, list[tuple[str, int, int, int]]] = {}
        tensor_groups: dict[str, set[str]] = {}
        for g in spec.groups:
            for m in g.members:
                axis_groups.setdefault((m.tensor, m.axis), []).append(g.name)
                lo, hi = m.span(g.size)
                spans.setdefault((m.tensor, m.axis), []).append((g.name, lo, hi, m.block))
                tensor_groups.setdefault(m.tensor, set()).add(g.name)
        inner: dict[tuple[str, str, int], list[str]] = {}
        outer: dict[str, set[str]] = {g.name: set() for g in spec.groups}
        for key, lst in spans.items():
            for i, (gname, lo, hi, block) in enumerate(lst):
                for hname, hlo, hhi, _ in lst[i + 1 :]:
                    if lo <= hlo and hhi <= hi and block > 1:
                        inner.setdefault((gname, key[0], key[1]), []).append(hname)
                        outer[hname].add(gname)
        # g's move changes h's features when g permutes one of h's slice axes: another axis of a
        # shared tensor, positions inside h's blocks, or the block that holds h. Disjoint ranges on
        # the same axis (two heads' dims) do not affect each other.
        neighbours: dict[str, set[str]] = {g.name: set() for g in spec.groups}
        for tensor_name, names in tensor_groups.items():
            members = [(g, m) for g in spec.groups if g.name in names for m in g.members if m.tensor == tensor_name]
            for g, mg in members:
                for h, mh in members:
                    if g.name == h.name:
                        continue
                    if mg.axis != mh.axis or h.name in outer[g.name] or g.name in outer[h.name]:
                        neighbours[g.name].add(h.name)
        return cls(spec, shapes, axis_groups, inner, outer, neighbours)

    def slice_axes(self, g: Group, m: Member) -> tuple[list[str], list[tuple[int, list[str]]]]:
        """Groups permuting inside this member's blocks, and per other axis the groups on it."""
        inner = self.inner.get((g.name, m.tensor, m.axis), [])
        others = [
            (a, self.axis_groups.get((m.tensor, a), []))
            for a in range(len(self.shapes[m.tensor]))
            if a != m.axis
        ]
        return inner, others

    def evidence(self, g: Group, resolved: set[str]) -> tuple[int, bool]:
        """How many aligned feature values per neuron the group has now, and whether all are."""
        total = 0
        full = True
        for m in g.members:
            inner, others = self.slice_axes(g, m)
            n = m.block if all(h in resolved for h in inner) else 1
            full &= n == m.block
            for a, gs in others:
                if all(h in resolved for h in gs):
                    n *= self.shapes[m.tensor][a]
                else:
                    full = False
            total += n
        return total, full


# ---------------------------------------------------------------------------------------------
# features and similarity


def _member_parts(
    t_ref: torch.Tensor, t_sus: torch.Tensor, g: Group, m: Member, reduce_inner: bool, reduce_axes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-neuron feature matrices (N x D) of one member for reference and suspect.

    Axes in ``reduce_axes`` (original axis numbers) and, with ``reduce_inner``, the positions
    inside a block are replaced by their mean and centred mean square: invariant to any
    permutation of those axes.
    """
    n, b = g.size, m.block
    xr, xs = member_blocks(t_ref, m, n), member_blocks(t_sus, m, n)
    others = [a for a in range(t_ref.dim()) if a != m.axis]
    dims = ([1] if reduce_inner and b > 1 else []) + [2 + others.index(a) for a in reduce_axes]
    if not dims:
        return [(xr.reshape(n, -1), xs.reshape(n, -1))]
    mean_r, mean_s = xr.mean(dim=dims).reshape(n, -1), xs.mean(dim=dims).reshape(n, -1)
    sq_r, sq_s = (xr * xr).mean(dim=dims).reshape(n, -1), (xs * xs).mean(dim=dims).reshape(n, -1)
    centre = sq_r.mean(dim=0, keepdim=True)
    return [(mean_r, mean_s), (sq_r - centre, sq_s - centre)]


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    # square().sum() rather than vector_norm: on a transposed view (a layer's input columns)
    # vector_norm takes a slow strided path, about 10x slower here
    norm = x.square().sum(dim=1).sqrt_()
    return torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))


def _weighted_cosines(parts: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """Sum over parts of ``D * cosine matrix`` and the sum of ``D``: ``S[i, j]`` = ref i vs suspect j.

    Features are often strided views (a transposed embedding table); the product and the norms
    read them in place. The normalisation is applied to whichever is smaller: the N x D
    features (few features per neuron) or the N x N product (an embedding table).
    """
    total = None
    weight = 0
    for fr, fs in parts:
        n, d = fr.shape
        fr, fs = fr.float(), fs.float()
        ir, js = _inv_norm(fr).mul_(d), _inv_norm(fs)
        if d < n:
            s = (fr * ir[:, None]) @ (fs * js[:, None]).T
        else:
            s = fr @ fs.T
            s *= ir[:, None]
            s *= js[None, :]
        total = s if total is None else total.add_(s)
        weight += d
    assert total is not None
    return total, weight


# ---------------------------------------------------------------------------------------------
# the solvers


class Work:
    """The suspect being re-synchronized: its tensors as loaded (never copied) and the composed
    index map of every touched axis; features are read through the maps (``features.chunks``)."""

    def __init__(self, suspect: Mapping[str, torch.Tensor], spec: Spec, device: torch.device):
        # a lazy suspect (``null.NullStateDict``: tensors produced when read) is read per access,
        # so the solver never holds all of it; a loaded one is kept as loaded
        self.t: Mapping[str, torch.Tensor] = (
            OnDevice(suspect, device) if getattr(suspect, "lazy", False)
            else {k: suspect[k].to(device) for k in spec.tensors}
        )
        shape = getattr(suspect, "shape", None)
        self.maps: dict[AxisKey, torch.Tensor] = {}
        self.moved: set[AxisKey] = set()
        self._moved_axes: dict[str, set[int]] = {}  # tensor -> its moved axes (read per member and solve)
        for g in spec.groups:
            for m in g.members:
                length = (shape(m.tensor) if callable(shape) else self.t[m.tensor].shape)[m.axis]
                self.maps.setdefault((m.tensor, m.axis), torch.arange(length))

    def apply(self, g: Group, p: torch.Tensor) -> None:
        for m in g.members:
            key = (m.tensor, m.axis)
            self.maps[key] = self.maps[key][expand(p.cpu(), m, self.maps[key].numel())]
            self.moved.add(key)
            self._moved_axes.setdefault(m.tensor, set()).add(m.axis)

    def axis_maps(self, tensor: str) -> dict[int, torch.Tensor]:
        """The index maps of ``tensor``'s moved axes (axis -> map)."""
        return {a: self.maps[(tensor, a)] for a in self._moved_axes.get(tensor, ())}

    def current(self, tensor: str) -> torch.Tensor:
        """The whole tensor in the current alignment (a copy when any axis moved)."""
        t = self.t[tensor]
        for a, idx in self.axis_maps(tensor).items():
            t = t.index_select(a, idx.to(t.device))
        return t

    def rows(self, m: Member, size: int) -> torch.Tensor:
        """``member_rows`` of the current alignment, float32, for small members."""
        return torch.cat(list(chunks(self.t[m.tensor], m, size, self.axis_maps(m.tensor), limit=1 << 62)), 1)


Outcome = tuple[dict[str, torch.Tensor], dict[str, _Stats], dict[str, torch.Tensor], int]
"""(permutation per group, statistics of each group's last solve, similarity matrices, sweeps)."""


@dataclass
class CacheEntry:
    """One member's similarity contribution, kept while no group on its slice axes moves.

    The group's own moves only reorder its columns: they are recorded in ``pending`` and applied
    on the next read, which spares the refinement the largest products (an embedding table)."""

    similarity: torch.Tensor
    weight: int
    stamp: tuple[int, ...]  # versions of the groups it depends on when it was computed
    pending: torch.Tensor | None = None  # columns to take: the current contribution is S[:, pending]

    def current(self) -> torch.Tensor:
        if self.pending is not None:
            self.similarity, self.pending = self.similarity[:, self.pending], None
        return self.similarity

    def reorder(self, p: torch.Tensor) -> None:
        self.pending = p if self.pending is None else self.pending[p]


class AssignmentSolver:
    """Whole-model re-synchronization: one maximum-similarity bijection per group, groups in
    order of aligned evidence (first pass), then re-solved until stable (refine)."""

    def __init__(self, ref: dict[str, torch.Tensor], work: Work, spec: Spec, active: Spec, *,
                 keep: bool = False, ignore: Iterable[tuple[str, int]] = (), sketch: bool = True,
                 candidates: int | None = None) -> None:  # fmt: skip
        self.ref, self.work, self.spec, self.active, self.keep = ref, work, spec, active, keep
        self.candidates = candidates  # assignments among each row's / column's best k (the null)
        self.sketch = sketch  # compare long members on sketches (features.Sketch), confirmed where close
        self.sketched = self.confirmed = 0  # solves that stood on a sketch / were redone exactly
        self.layout = _Layout.build(spec, {k: v.shape for k, v in ref.items()})
        ignored = set(ignore)
        # members used as evidence: all but the ignored ones, unless that would leave none
        self.evidence = {
            g.name: [(mi, m) for mi, m in enumerate(g.members) if (m.tensor, m.axis) not in ignored]
            or list(enumerate(g.members))
            for g in spec.groups
        }
        self.active_names = set(active.names)
        self.resolved: set[str] = set(spec.names) - self.active_names  # groups outside `active`: unpermuted
        self.stats: dict[str, _Stats] = {}
        self.sims: dict[str, torch.Tensor] = {}
        self.version = {n: 0 for n in spec.names}
        self.cache: dict[tuple[str, int], CacheEntry] = {}
        self.deps: dict[tuple[str, int], tuple[str, ...]] = {}
        for g in active.groups:
            for mi, m in enumerate(g.members):
                inner, others = self.layout.slice_axes(g, m)
                deps = set(inner) | {h for _, gs in others for h in gs} | self.layout.outer[g.name]
                self.deps[(g.name, mi)] = tuple(sorted(deps))

    def run(self, max_sweeps: int, step: Callable[[str], None]) -> Outcome:
        dirty = self.first_pass(step)
        sweeps = self.refine(dirty, max_sweeps)
        perms = compose_permutations(self.spec, self.work.maps)
        return {n: perms[n] for n in self.active.names}, self.stats, self.sims, sweeps

    def first_pass(self, step: Callable[[str], None]) -> set[str]:
        """Solve every active group once, best evidence first; return the groups to re-solve."""
        layout, resolved = self.layout, self.resolved
        pending = list(self.active.groups)
        order = {g.name: i for i, g in enumerate(pending)}
        score = {g.name: layout.evidence(g, resolved) for g in pending}
        dirty: set[str] = set()
        while pending:
            eligible = [g for g in pending if layout.outer[g.name] <= resolved]
            g = max(eligible, key=lambda h: (score[h.name][0], -order[h.name]))
            full = score[g.name][1]
            moved = self.solve(g)
            resolved.add(g.name)
            pending.remove(g)
            for h in pending:  # only groups whose slices g touches gain evidence
                if h.name in layout.neighbours[g.name]:
                    score[h.name] = layout.evidence(h, resolved)
            if not full:
                dirty.add(g.name)
            if moved:
                dirty |= layout.neighbours[g.name] & resolved & self.active_names
            step(g.name)
        return dirty

    def refine(self, dirty: set[str], max_sweeps: int) -> int:
        """Re-solve dirty groups with everything aligned until nothing moves; return the sweeps."""
        sweeps = 0
        while dirty and sweeps < max_sweeps:
            sweeps += 1
            todo = [g for g in self.active.groups if g.name in dirty]
            dirty = set()
            for g in todo:
                if self.solve(g):
                    dirty |= self.layout.neighbours[g.name] & self.active_names
                    dirty.discard(g.name)
        return sweeps

    def solve(self, g: Group) -> bool:
        """Solve one group against the current alignment; True when it moved anything."""
        # evidence that a first solve can stand on without invariant summaries: members read in
        # full (a member aligned on its other axes but not inside its blocks does not count)
        aligned = sum(_features(self.ref[m.tensor], m) for _, m in self.evidence[g.name] if self._full(g, m))
        acc, scalars, long = self._similarity(g, aligned)
        if acc.total is None and not scalars and not long:
            # Every member was skipped as only partly aligned although together they count as
            # strong evidence (e.g. a heads group of BERT-large, 4 x 1024 values per head, with
            # its dims-inside-heads groups unsolved): use their invariant summaries after all.
            aligned = 0
            acc, scalars, long = self._similarity(g, aligned)
        if scalars:
            acc.add(*self.scalar_similarity(g, scalars), False)
        sketch = None
        width = sketch_width(sum(_features(self.ref[m.tensor], m) for _, m in long))
        if long and width is None:
            for mi, m in long:  # too few features for a sketch to pay: exact products
                part = self.member_similarity(g, mi, m, aligned)
                if part is not None:
                    acc.add(*part)
        elif long:
            sketch = Sketch(g.size, width, next(iter(self.ref.values())).device)
            for mi, m in long:
                sketch.add(self._chunks(g, m, ref=True), self._chunks(g, m, ref=False), seed=mi,
                           width=_features(self.ref[m.tensor], m))
        s = acc.result(sketch)
        p = _assign(s, self.candidates)
        if sketch is not None and g.size > 1:
            # The matched entries exactly, the alternatives sketched. When every exact match
            # beats its sketched alternatives by more than any alternative's error (w.h.p.), p
            # is the row- and column-argmax of the exact matrix, hence the exact assignment;
            # otherwise the group is solved again on exact features.
            members = dict(long)
            idx, pd = torch.arange(g.size, device=s.device), p.to(s.device)
            exact = sketch.matched(pd, lambda mi: (self._chunks(g, members[mi], ref=True),
                                                   self._chunks(g, members[mi], ref=False)))
            if acc.total is not None:
                exact += acc.total[idx, pd]
            s[idx, pd] = exact / (acc.weight + sketch.weight)
            share = sketch.weight / (acc.weight + sketch.weight)
            if float(margins(s, p).min()) < CONFIRM_SIGMAS * sketch.error * share:
                self.confirmed += 1
                for mi, m in long:
                    part = self.member_similarity(g, mi, m, aligned)
                    if part is not None:
                        acc.add(*part)
                s = acc.result(None)
                p = _assign(s, self.candidates)
            else:
                self.sketched += 1
        self.stats[g.name] = _stats(s, p)
        if self.keep:
            self.sims[g.name] = s.cpu()
        if torch.equal(p, torch.arange(g.size)):
            return False
        self.work.apply(g, p)
        self.version[g.name] += 1
        pd = p.to(s.device)
        for mi in range(len(g.members)):
            key = (g.name, mi)
            if key in self.cache and g.name not in self.deps[key]:  # else the stamp no longer matches
                self.cache[key].reorder(pd)
        return True

    def _similarity(self, g: Group, aligned: int) -> tuple[_Sum, list[Member], list[tuple[int, Member]]]:
        """The summed similarity of the group's exact non-scalar evidence members (``total`` None
        when all are skipped), the scalar members to compare together, and the long members to
        compare on a sketch."""
        acc = _Sum()
        scalars: list[Member] = []
        long: list[tuple[int, Member]] = []  # fully aligned, uncached, many features: sketch candidates
        for mi, m in self.evidence[g.name]:
            inner, others = self.layout.slice_axes(g, m)
            if m.block == 1 and not others:
                scalars.append(m)  # one number per neuron: compared together, see scalar_similarity
                continue
            if self.sketch and self.sketchable(g, mi, m):
                long.append((mi, m))
                continue
            part = self.member_similarity(g, mi, m, aligned)
            if part is not None:
                acc.add(*part)
        return acc, scalars, long

    def _full(self, g: Group, m: Member) -> bool:
        """Whether every group permuting inside the member's blocks or on its other axes is resolved."""
        inner, others = self.layout.slice_axes(g, m)
        return all(h in self.resolved for h in inner) and all(h in self.resolved for _, gs in others for h in gs)

    def sketchable(self, g: Group, mi: int, m: Member) -> bool:
        """A member that may be compared on a sketch (``solve`` decides whether the group's
        candidates together have features enough, ``features.sketch_width``): fully aligned,
        no valid cached product, in a group wide enough for sketches to pay."""
        if g.size < SKETCH_MIN_NEURONS:
            return False
        if not self._full(g, m):
            return False
        key = (g.name, mi)
        hit = self.cache.get(key)
        return hit is None or hit.stamp != tuple(self.version[h] for h in self.deps[key])

    def _chunks(self, g: Group, m: Member, *, ref: bool) -> Iterator[torch.Tensor]:
        if ref:
            return chunks(self.ref[m.tensor], m, g.size)
        return chunks(self.work.t[m.tensor], m, g.size, self.work.axis_maps(m.tensor))

    def member_similarity(self, g: Group, mi: int, m: Member, aligned: int) -> tuple[torch.Tensor, int, bool] | None:
        """One member's weighted cosines (ref x suspect), its weight, and whether the matrix is
        the cache's (the caller must not modify it); None when the member is skipped."""
        inner, others = self.layout.slice_axes(g, m)
        reduce_inner = not all(h in self.resolved for h in inner)
        reduce_axes = [a for a, gs in others if not all(h in self.resolved for h in gs)]
        if (reduce_inner or reduce_axes) and aligned >= STRONG_EVIDENCE:
            return None  # invariant summaries are a fallback; refinement sees these members in full
        key = (g.name, mi)
        stamp = tuple(self.version[h] for h in self.deps[key])
        hit = self.cache.get(key)
        if hit is not None and hit.stamp == stamp:
            return hit.current(), hit.weight, True
        if reduce_inner or reduce_axes:
            s_m, w_m = _weighted_cosines(
                _member_parts(self.ref[m.tensor], self.work.current(m.tensor), g, m, reduce_inner, reduce_axes)
            )
        else:
            r, u = self._chunks(g, m, ref=True), self._chunks(g, m, ref=False)
            if _features(self.ref[m.tensor], m) * g.size <= CHUNK_ELEMS:
                s_m, w_m = _weighted_cosines([(next(r), next(u))])  # one slice: the cheaper normalisation
            else:
                s_m, w_m = streamed_cosines(r, u, g.size)
        # keep it when recomputing would cost more than storing it: many features per neuron
        # (an embedding table), not a square layer whose N x N matrix is larger
        shared = not reduce_inner and not reduce_axes and w_m > g.size
        if shared:
            self.cache[key] = CacheEntry(s_m, w_m, stamp)
        return s_m, w_m, shared

    def scalar_similarity(self, g: Group, members: list[Member]) -> tuple[torch.Tensor, int]:
        """Members of one number per neuron (a bias, a norm's scale, a running mean): alone a
        cosine of one number is only a sign, so they are compared together, as one vector,
        standardised by the reference's spread over neurons (a variance or a norm scale is
        about 1 everywhere, and only its deviations tell neurons apart)."""
        a = torch.cat([member_rows(self.ref[m.tensor], m, g.size) for m in members], 1).float()
        b = torch.cat([self.work.rows(m, g.size) for m in members], 1).float()
        mu, sd = a.mean(0, keepdim=True), a.std(0, keepdim=True) if g.size > 1 else torch.ones_like(a[:1])
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        return _weighted_cosines([((a - mu) / sd, (b - mu) / sd)])


def _features(t: torch.Tensor, m: Member) -> int:
    """Feature values per neuron of member ``m``: its block times the tensor's other axes."""
    return m.block * (t.numel() // max(1, t.shape[m.axis]))


class _Sum:
    """Running sum of members' ``D * cosine`` matrices and their weights ``D``."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.weight = 0

    def add(self, s: torch.Tensor, w: int, shared: bool) -> None:
        if self.total is None:
            self.total = s.clone() if shared else s
        else:
            self.total.add_(s)
        self.weight += w

    def result(self, sketch: Sketch | None) -> torch.Tensor:
        """The group's similarity: the sum (plus a sketch's estimate) over the total weight."""
        if sketch is None:
            assert self.total is not None
            return self.total / self.weight
        est = sketch.similarity()
        if self.total is not None:
            est += self.total
        return est.div_(self.weight + sketch.weight)


def paper_solver(ref: dict[str, torch.Tensor], work: Work, active: Spec, step: Callable[[str], None],
                 keep: bool) -> Outcome:  # fmt: skip
    """Algorithm 1 of the paper: per group in order, cosine of own weights, row argmax."""
    perms: dict[str, torch.Tensor] = {}
    stats: dict[str, _Stats] = {}
    sims: dict[str, torch.Tensor] = {}
    for g in active.groups:
        own = [m for m in g.out_members if ref[m.tensor].dim() >= 2] or list(g.out_members) or list(g.members)
        fr = torch.cat([member_rows(ref[m.tensor], m, g.size) for m in own], dim=1).float()
        fs = torch.cat([work.rows(m, g.size) for m in own], dim=1)
        s = (fr @ fs.T) * _inv_norm(fr)[:, None] * _inv_norm(fs)[None, :]
        p = s.argmax(dim=1).cpu()
        stats[g.name] = _stats(s, p)
        if keep:
            sims[g.name] = s.cpu()
        perms[g.name] = p
        work.apply(g, p)
        step(g.name)
    return perms, stats, sims, 0
