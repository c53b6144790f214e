"""Re-synchronization: put a suspect's permuted neurons back in the reference order.

The paper's Algorithm 1 matches one layer's neurons by the cosine similarity of their weights
and takes a greedy argmax. Here every group of a spec is solved at once, as a bijection:

1. **Order.** Groups are resolved one at a time, always the one with the most *aligned*
   evidence: slices whose other axes are unpermuted (a network's input, an embedding's
   vocabulary) or already resolved. Nested groups wait for their outer group.
2. **Invariant features.** A slice axis still held by an unresolved group is reduced by its
   mean and its (centred) mean square, which no permutation of that axis can change; an
   untouched copy then still has cosine 1 on its true pairs.
3. **Assignment.** Similarity is the dimension-weighted mean of per-member cosines (so a
   function-preserving rescale of a neuron keeps similarity 1). The greedy row argmax is kept
   when it is already a bijection; otherwise ``scipy.optimize.linear_sum_assignment``.
4. **Refinement.** Groups solved on partial evidence, and neighbours of any group that moved,
   are solved again with everything aligned until nothing changes.

Permutations follow DESIGN.md section 2: ``resynced = suspect.index_select(axis, p)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import log_ndtr

from findlady_core.errors import InputError
from findlady_core.permute import AxisKey, compose_permutations, expand
from findlady_core.spec import Group, Member, Spec

AMBIGUOUS_MARGIN = 0.01
"""A neuron whose matched similarity beats its best alternative by less than this is ambiguous."""

METHODS = ("findlady", "paper")

STRONG_EVIDENCE = 4096
"""Aligned feature values per neuron above which a first solve skips invariant summaries."""


@dataclass
class GroupResult:
    """What re-synchronization found for one group (the report's ``resync.groups`` entry)."""

    name: str
    size: int
    permutation: torch.Tensor
    moved: int
    mean_similarity: float
    min_margin: float
    ambiguous: int
    log10_p_value: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "moved": self.moved,
            "mean_similarity": self.mean_similarity,
            "min_margin": self.min_margin,
            "ambiguous": self.ambiguous,
            "log10_p_value": self.log10_p_value,
            "permutation": self.permutation.tolist(),
        }


@dataclass
class ResyncResult:
    """The re-synchronized state dict, one permutation per group, and the confidence in them."""

    state_dict: dict[str, torch.Tensor]
    permutations: dict[str, torch.Tensor]
    groups: list[GroupResult]
    log10_p_value: float
    seconds: float
    method: str
    device: str
    sweeps: int
    similarities: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def similarity_p_value(self) -> float:
        return 10.0**self.log10_p_value if self.log10_p_value > -300 else 0.0

    @property
    def moved(self) -> int:
        return sum(g.moved for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        """The report's ``resync`` block (DESIGN.md section 5)."""
        return {
            "method": self.method,
            "device": self.device,
            "groups": [g.to_dict() for g in self.groups],
            "moved": self.moved,
            "similarity_p_value": self.similarity_p_value,
            "log10_p_value": self.log10_p_value,
            "ambiguous_margin": AMBIGUOUS_MARGIN,
            "sweeps": self.sweeps,
            "seconds": self.seconds,
        }


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(device)


def check_compatible(reference: Mapping[str, torch.Tensor], suspect: Mapping[str, torch.Tensor], spec: Spec) -> None:
    """The suspect must have the reference's tensors, shapes and floating dtypes on the spec's tensors."""
    spec.validate(reference)
    for name in sorted(spec.tensors):
        s = suspect.get(name)
        if s is None:
            raise InputError(f"suspect has no tensor {name!r}")
        if s.shape != reference[name].shape:
            raise InputError(f"tensor {name!r}: suspect shape {tuple(s.shape)} differs from reference {tuple(reference[name].shape)}")
        if not s.is_floating_point():
            raise InputError(f"tensor {name!r}: suspect has {s.dtype}, not floating point")


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

    def view(t: torch.Tensor) -> torch.Tensor:
        x = t.narrow(m.axis, m.offset, n * b).movedim(m.axis, 0)
        return x.reshape(n, b, *x.shape[1:])

    xr, xs = view(t_ref), view(t_sus)
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


def _assign(s: torch.Tensor) -> torch.Tensor:
    """Maximum-similarity bijection: ``p[i]`` = suspect position of reference neuron i."""
    arg = s.argmax(dim=1)
    if torch.unique(arg).numel() == s.shape[0]:
        return arg.cpu()
    rows, cols = linear_sum_assignment(s.detach().cpu().double().numpy(), maximize=True)
    p = torch.empty(s.shape[0], dtype=torch.int64)
    p[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return p


@dataclass
class _Stats:
    matched: torch.Tensor
    margin: torch.Tensor
    log_p: torch.Tensor  # natural log of each neuron's p-value


def _stats(s: torch.Tensor, p: torch.Tensor) -> _Stats:
    """Matched similarity, margin over the best alternative, and a per-neuron p-value.

    The p-value asks how likely an unrelated neuron would stand this far above its row: the
    matched entry's z-score against the rest of the row, Bonferroni-corrected for being the
    best of N (a naive null would ignore that the assignment picks maxima).
    """
    n = s.shape[0]
    idx = torch.arange(n, device=s.device)
    p = p.to(s.device)
    matched = s[idx, p]
    if n == 1:
        return _Stats(matched.float().cpu(), torch.ones(1), torch.zeros(1, dtype=torch.float64))

    # the best alternative place for reference neuron i: the row's top-1 unless it is the match
    rv, ri = s.topk(2, dim=1)
    alt = torch.where(ri[:, 0] == p, rv[:, 1], rv[:, 0])
    margin = (matched - alt).double().cpu()
    m = matched.double().cpu()
    row_sum = s.sum(dim=1).double().cpu()
    row_sq = torch.linalg.vector_norm(s, dim=1).double().cpu() ** 2
    mu = (row_sum - m) / (n - 1)
    var = (row_sq - m * m) / (n - 1) - mu * mu
    sd = var.clamp_min(1e-24).sqrt()
    z = ((m - mu) / sd).numpy()
    log_p = np.minimum(0.0, math.log(n) + log_ndtr(-z))
    return _Stats(m.float(), margin.float(), torch.from_numpy(log_p))


def combine_log_p(log_ps: Iterable[torch.Tensor]) -> float:
    """Fisher's combination of per-neuron natural-log p-values, returned as log10.

    ``X = -2 sum(ln p)`` follows chi-squared with 2n degrees of freedom under the null; its tail
    is taken through the Wilson-Hilferty normal approximation, which stays finite where the
    exact tail underflows. Neurons without evidence (p = 1) add nothing, as they should.
    """
    parts = [x.flatten() for x in log_ps]
    if not parts:
        return 0.0
    lp = torch.cat(parts).double().numpy()
    if lp.size == 0:
        return 0.0
    k = 2.0 * lp.size
    x = -2.0 * float(lp.sum())
    if x <= 0:
        return 0.0
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return float(min(0.0, log_ndtr(-z) / math.log(10)))


# ---------------------------------------------------------------------------------------------
# the solver


class _Work:
    """The suspect being re-synchronized, with the composed index map of every touched axis."""

    def __init__(self, suspect: Mapping[str, torch.Tensor], spec: Spec, device: torch.device):
        self.t: dict[str, torch.Tensor] = {k: suspect[k].to(device) for k in spec.tensors}
        self.maps: dict[AxisKey, torch.Tensor] = {}
        for g in spec.groups:
            for m in g.members:
                self.maps.setdefault((m.tensor, m.axis), torch.arange(self.t[m.tensor].shape[m.axis]))

    def apply(self, g: Group, p: torch.Tensor) -> None:
        for m in g.members:
            t = self.t[m.tensor]
            idx = expand(p, m, t.shape[m.axis])
            self.t[m.tensor] = t.index_select(m.axis, idx.to(t.device))
            key = (m.tensor, m.axis)
            self.maps[key] = self.maps[key][idx]


def resync(
    reference: Mapping[str, torch.Tensor],
    suspect: Mapping[str, torch.Tensor],
    spec: Spec,
    *,
    method: str = "findlady",
    groups: list[str] | None = None,
    device: str = "auto",
    max_sweeps: int = 4,
    progress: bool | Callable[[str], None] = False,
    keep_similarities: bool = False,
    ignore: Iterable[tuple[str, int]] = (),
) -> ResyncResult:
    """Re-synchronize ``suspect`` to ``reference`` on the groups of ``spec``.

    ``groups`` limits the search to those groups (the others are taken as unpermuted), e.g. the
    paper's one-layer setting. ``method="paper"`` reproduces the paper's Algorithm 1: each group
    in spec order, cosine of the neurons' own weights, greedy argmax (which may map two neurons to
    one place; kept for comparison, never for verdicts).

    ``ignore`` lists (tensor, axis) members that are moved but not used as evidence. The report
    ignores the input axes of a watermarked layer: matching neurons on the very weights the
    watermark is read from would pull an unrelated model's bits towards the key.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    check_compatible(reference, suspect, spec)
    start = time.perf_counter()
    dev = pick_device(device)
    active = spec.select(groups)
    ref = {k: reference[k].to(dev) for k in spec.tensors}
    work = _Work(suspect, spec, dev)
    bar = _progress(progress, len(active.groups))
    if method == "paper":
        perms, results, sims, sweeps = _paper(ref, work, active, bar, keep_similarities)
    else:
        perms, results, sims, sweeps = _findlady(ref, work, spec, active, max_sweeps, bar, keep_similarities, set(ignore))
    bar.close()
    out = dict(suspect)
    for k, v in work.t.items():
        out[k] = v.cpu()
    log10_p = combine_log_p([r[1] for r in results.values()])
    group_results = []
    for g in active.groups:
        p = perms[g.name]
        st: _Stats = results[g.name][0]
        group_results.append(
            GroupResult(
                name=g.name,
                size=g.size,
                permutation=p,
                moved=int((p != torch.arange(g.size)).sum()),
                mean_similarity=float(st.matched.mean()),
                min_margin=float(st.margin.min()),
                ambiguous=int((st.margin < AMBIGUOUS_MARGIN).sum()),
                log10_p_value=combine_log_p([st.log_p]),
            )
        )
    return ResyncResult(
        state_dict=out,
        permutations=perms,
        groups=group_results,
        log10_p_value=log10_p,
        seconds=time.perf_counter() - start,
        method=method,
        device=str(dev),
        sweeps=sweeps,
        similarities=sims,
    )


class _progress:
    """A tqdm bar on stderr, a callback, or nothing."""

    def __init__(self, progress: bool | Callable[[str], None], total: int):
        self.cb = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="resync", unit="group", leave=False)

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(name[-40:], refresh=False)
        if self.cb is not None:
            self.cb(name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _findlady(
    ref: dict[str, torch.Tensor],
    work: _Work,
    spec: Spec,
    active: Spec,
    max_sweeps: int,
    bar: _progress,
    keep: bool,
    ignore: set[tuple[str, int]],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[_Stats, torch.Tensor]], dict[str, torch.Tensor], int]:
    layout = _Layout.build(spec, {k: v.shape for k, v in ref.items()})
    # members used as evidence: all but the ignored ones, unless that would leave none
    evidence_members = {
        g.name: [(mi, m) for mi, m in enumerate(g.members) if (m.tensor, m.axis) not in ignore]
        or list(enumerate(g.members))
        for g in spec.groups
    }
    active_names = set(active.names)
    # groups outside ``active`` count as resolved (unpermuted) from the start
    resolved: set[str] = set(spec.names) - active_names
    pending = [g for g in active.groups]
    dirty: set[str] = set()
    stats: dict[str, _Stats] = {}  # of each group's latest solve
    sims: dict[str, torch.Tensor] = {}
    # A member whose slice was fully aligned keeps its similarity contribution until a group on
    # its slice axes moves; the group's own moves only reorder its columns. This spares the
    # refinement from recomputing the largest products (an embedding table, say).
    version = {n: 0 for n in spec.names}
    # entry: (S_m, weight, stamp, cp) with the current contribution S_m[:, cp] (cp None: S_m)
    cache: dict[tuple[str, int], tuple[torch.Tensor, int, tuple[int, ...], torch.Tensor | None]] = {}
    deps: dict[tuple[str, int], tuple[str, ...]] = {}
    for g in active.groups:
        for mi, m in enumerate(g.members):
            inner, others = layout.slice_axes(g, m)
            deps[(g.name, mi)] = tuple(sorted(set(inner) | {h for _, gs in others for h in gs} | layout.outer[g.name]))

    def solve(g: Group) -> bool:
        """Solve one group against the current alignment; True when it moved anything."""
        total, weight = None, 0
        scalars: list[tuple[torch.Tensor, torch.Tensor]] = []
        aligned, _ = layout.evidence(g, resolved)
        for mi, m in evidence_members[g.name]:
            inner, others = layout.slice_axes(g, m)
            reduce_inner = not all(h in resolved for h in inner)
            reduce_axes = [a for a, gs in others if not all(h in resolved for h in gs)]
            if (reduce_inner or reduce_axes) and aligned >= STRONG_EVIDENCE:
                continue  # invariant summaries are a fallback; refinement sees these members in full
            if m.block == 1 and not others:
                # one number per neuron (a bias, a norm's scale, a running mean): alone its
                # cosine is only a sign, so such members are compared together, as one vector
                scalars.append((ref[m.tensor].narrow(0, m.offset, g.size)[:, None],
                                work.t[m.tensor].narrow(0, m.offset, g.size)[:, None]))
                continue
            key = (g.name, mi)
            stamp = tuple(version[h] for h in deps[key])
            hit = cache.get(key)
            if hit is not None and hit[2] == stamp:
                s_m, w_m, _, cp = hit
                if cp is not None:  # apply the group's own moves since it was computed
                    s_m = s_m[:, cp]
                    cache[key] = (s_m, w_m, stamp, None)
                shared = True
            else:
                s_m, w_m = _weighted_cosines(
                    _member_parts(ref[m.tensor], work.t[m.tensor], g, m, reduce_inner, reduce_axes)
                )
                # keep it when recomputing would cost more than storing it: many features per
                # neuron (an embedding table), not a square layer whose N x N matrix is larger
                shared = not reduce_inner and not reduce_axes and w_m > g.size
                if shared:
                    cache[key] = (s_m, w_m, stamp, None)
            if total is None:
                total = s_m.clone() if shared else s_m
            else:
                total.add_(s_m)
            weight += w_m
        if scalars:
            # standardised by the reference's spread over neurons: a variance or a norm scale is
            # about 1 everywhere, and only its deviations tell neurons apart
            a = torch.cat([x for x, _ in scalars], 1).float()
            b = torch.cat([y for _, y in scalars], 1).float()
            mu, sd = a.mean(0, keepdim=True), a.std(0, keepdim=True) if g.size > 1 else torch.ones_like(a[:1])
            sd = torch.where(sd > 0, sd, torch.ones_like(sd))
            s_m, w_m = _weighted_cosines([((a - mu) / sd, (b - mu) / sd)])
            total = s_m if total is None else total.add_(s_m)
            weight += w_m
        assert total is not None
        s = total.div_(weight)
        p = _assign(s)
        stats[g.name] = _stats(s, p)
        if keep:
            sims[g.name] = s.cpu()
        if torch.equal(p, torch.arange(g.size)):
            return False
        work.apply(g, p)
        version[g.name] += 1
        pd = p.to(s.device)
        for mi in range(len(g.members)):
            key = (g.name, mi)
            if key in cache and g.name not in deps[key]:  # else the stamp no longer matches
                s_m, w_m, stamp, cp = cache[key]
                cache[key] = (s_m, w_m, stamp, pd if cp is None else cp[pd])
        return True

    order = {g.name: i for i, g in enumerate(active.groups)}
    score = {g.name: layout.evidence(g, resolved) for g in pending}
    while pending:
        eligible = [g for g in pending if layout.outer[g.name] <= resolved]
        g = max(eligible, key=lambda h: (score[h.name][0], -order[h.name]))
        full = score[g.name][1]
        moved = solve(g)
        resolved.add(g.name)
        pending.remove(g)
        for h in pending:  # only groups whose slices g touches gain evidence
            if h.name in layout.neighbours[g.name]:
                score[h.name] = layout.evidence(h, resolved)
        if not full:
            dirty.add(g.name)
        if moved:
            dirty |= layout.neighbours[g.name] & resolved & active_names
        bar.step(g.name)

    sweeps = 0
    while dirty and sweeps < max_sweeps:
        sweeps += 1
        todo = [g for g in active.groups if g.name in dirty]
        dirty = set()
        for g in todo:
            if solve(g):
                dirty |= layout.neighbours[g.name] & active_names
                dirty.discard(g.name)
    perms = compose_permutations(spec, work.maps)
    results = {n: (st, st.log_p) for n, st in stats.items()}
    return {n: perms[n] for n in active.names}, results, sims, sweeps


def _paper(
    ref: dict[str, torch.Tensor], work: _Work, active: Spec, bar: _progress, keep: bool
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[_Stats, torch.Tensor]], dict[str, torch.Tensor], int]:
    """Algorithm 1 of the paper: per group in order, cosine of own weights, row argmax."""
    perms: dict[str, torch.Tensor] = {}
    results: dict[str, tuple[_Stats, torch.Tensor]] = {}
    sims: dict[str, torch.Tensor] = {}
    for g in active.groups:
        own = [m for m in g.out_members if ref[m.tensor].dim() >= 2] or list(g.out_members) or list(g.members)
        parts = [
            (ref[m.tensor].narrow(m.axis, m.offset, g.size * m.block).movedim(m.axis, 0).reshape(g.size, -1),
             work.t[m.tensor].narrow(m.axis, m.offset, g.size * m.block).movedim(m.axis, 0).reshape(g.size, -1))
            for m in own
        ]
        fr = torch.cat([a for a, _ in parts], dim=1).float()
        fs = torch.cat([b for _, b in parts], dim=1).float()
        s = (fr @ fs.T) * _inv_norm(fr)[:, None] * _inv_norm(fs)[None, :]
        p = s.argmax(dim=1).cpu()
        st = _stats(s, p)
        results[g.name] = (st, st.log_p)
        if keep:
            sims[g.name] = s.cpu()
        perms[g.name] = p
        for m in g.members:
            t = work.t[m.tensor]
            work.t[m.tensor] = t.index_select(m.axis, expand(p, m, t.shape[m.axis]).to(t.device))
        bar.step(g.name)
    return perms, results, sims, 0
