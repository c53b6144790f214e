"""Neuron features streamed in float32 slices: exact products and random-sign sketches.

A group's similarity is built one member at a time, and a long member (an embedding table, a
deep model's residual stream) one slice at a time, so the float32 working set is one slice
(``CHUNK_ELEMS`` values), whatever the model's size or dtype: bf16 weights are converted slice
by slice (bf16 products are about 200x slower than float32 ones on a CPU).

The suspect is read in its current alignment through index maps (``Work`` in
``findlady_core.solver``): a slice is gathered from the loaded, untouched tensor with the
maps of its axes, never from a permuted copy of the model.

**Sketches.** For a group whose members have far more features than it has neurons, comparing
every pair of neurons on all features costs ``2 N^2 D``. A CountSketch-style projection (each
feature gets a random sign and is added into one of ``k`` buckets) keeps inner products in
expectation, with an error of standard deviation at most ``sqrt(2 / k)`` on a cosine
(Johnson-Lindenstrauss; Charikar et al. 2002), for ``O(N D)`` work plus a ``2 N^2 k`` product.
The solver then computes each neuron's matched similarity exactly (``matched_cosines``, ``O(N
D)``, ``Sketch.matched``) and keeps the sketched assignment only when every matched similarity exceeds the neuron's
best sketched alternative by far more than that error; otherwise it solves the group again on
exact features (``findlady_core.solver``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from findlady_core.spec import Member

CHUNK_ELEMS = 1 << 24
"""float32 values per streamed slice (64 MB): bounds the working set of one product."""

SKETCH_WIDTH = 8192
"""Most buckets of a sketch: a cosine's sketch error has standard deviation below sqrt(2/8192) = 0.016."""
SKETCH_MIN_WIDTH = 512
"""Fewest buckets: below this the confirmation threshold (``solver.CONFIRM_SIGMAS`` standard
deviations of sqrt(2/k), 0.56 at 512) would exceed the margins of a clear match (an MLP neuron of
BERT-base with noise 0.1: 0.86 exact, about 0.7 against sketched alternatives), and every sketch
would be redone."""
SKETCH_GAIN = 3
"""A sketch has at most a third as many buckets as the features it folds: its product is at
least 3x cheaper than the exact one, so a sketch that is redone costs at most a third more."""

KEEP_ELEMS = 1 << 25
"""Slice values (128 MB) a sketch may keep for ``Sketch.matched`` instead of reading them again."""

SKETCH_SEED = 0x5EED  # fixed: the same input gives the same sketch, so verdicts are reproducible


def sketch_width(features: int) -> int | None:
    """Buckets for a sketch of ``features`` values per neuron (a multiple of 128), or None when
    a sketch would not pay: as wide as ``SKETCH_GAIN`` allows, at most ``SKETCH_WIDTH``.

    The width follows the features so that a group of moderately long members (an MLP's
    neurons, 2 x hidden values each) gains too: BERT-base's 1,536 -> 512 buckets, a 1.1B
    Llama's 6,144 -> 2,048, the residual streams' 10^5 and more -> 8,192."""
    k = min(SKETCH_WIDTH, features // SKETCH_GAIN // 128 * 128)
    return k if k >= SKETCH_MIN_WIDTH else None


def _take(t: torch.Tensor, axis: int, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Positions ``[start, stop)`` of ``axis`` in the current alignment (``index``: the map)."""
    if index is None:
        return t.narrow(axis, start, stop - start)
    return t.index_select(axis, index[start:stop].to(t.device))


def chunks(
    t: torch.Tensor, m: Member, n: int, maps: Mapping[int, torch.Tensor] | None = None, *,
    limit: int = CHUNK_ELEMS, dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor]:
    """Member ``m``'s features of tensor ``t`` as ``n x d`` slices in ``dtype``.

    ``maps`` holds the current index map of each permuted axis of ``t`` (``current[t] =
    t.index_select(axis, map)``). Slices split the tensor's longest other axis, so the same
    tensor shape always gives the same slices: reference and suspect slices line up.
    """
    maps = maps or {}
    axis, lo, hi = m.axis, m.offset, m.offset + n * m.block
    others = [a for a in range(t.dim()) if a != axis]
    if not others:
        yield _take(t, axis, maps.get(axis), lo, hi).to(dtype).reshape(n, -1)
        return
    split = max(others, key=lambda a: t.shape[a])
    per = n * m.block * math.prod(t.shape[a] for a in others if a != split)
    step = max(1, limit // max(1, per))
    length = t.shape[split]
    own_first = hi - lo < t.shape[axis]  # a head's rows: select them before slicing, not the whole tensor
    if own_first:
        t = _take(t, axis, maps.get(axis), lo, hi)
    for start in range(0, length, step):
        stop = min(length, start + step)
        x = _take(t, split, maps.get(split), start, stop)
        if not own_first:
            x = _take(x, axis, maps.get(axis), lo, hi)
        for a in others:
            if a != split and a in maps:
                x = x.index_select(a, maps[a].to(x.device))
        yield x.to(dtype).movedim(axis, 0).reshape(n, -1)


def _inv(norm_sq: torch.Tensor) -> torch.Tensor:
    norm = norm_sq.sqrt()
    return torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))


def streamed_cosines(ref: Iterator[torch.Tensor], sus: Iterator[torch.Tensor], n: int) -> tuple[torch.Tensor, int]:
    """``D * cosine matrix`` (ref rows x suspect columns) and ``D``, accumulated over slices."""
    total: torch.Tensor | None = None
    rr = ss = None
    d = 0
    for fr, fs in zip(ref, sus, strict=True):
        total = fr @ fs.T if total is None else total.addmm_(fr, fs.T)
        r2, s2 = fr.square().sum(1), fs.square().sum(1)
        rr = r2 if rr is None else rr.add_(r2)
        ss = s2 if ss is None else ss.add_(s2)
        d += fr.shape[1]
    assert total is not None and rr is not None and ss is not None
    total *= (_inv(rr) * d)[:, None]
    total *= _inv(ss)[None, :]
    return total, d


class Sketch:
    """Sums of sketched, per-member normalised features of one group (reference and suspect).

    Member ``m`` adds ``sqrt(D_m) * x / ||x||`` folded into ``k`` buckets with random signs, so
    ``ref @ sus.T`` estimates ``sum_m D_m * cosine_m``: the same weighting as exact members.
    Each member's norms (and, up to ``keep`` values, its signed slices) are kept for
    ``matched``, the exact similarity of matched pairs."""

    def __init__(self, n: int, k: int, device: torch.device, keep: int = KEEP_ELEMS) -> None:
        self.n, self.k = n, k
        self.ref = torch.zeros(n, k, device=device)
        self.sus = torch.zeros(n, k, device=device)
        self.weight = 0
        self.keep = keep  # slice values (both models) that may still be kept
        self.members: dict[int, tuple[torch.Tensor, torch.Tensor, int, list[tuple[torch.Tensor, torch.Tensor]] | None]] = {}

    def add(self, ref: Iterator[torch.Tensor], sus: Iterator[torch.Tensor], seed: int, width: int | None = None) -> None:
        """Fold one member's slices in (``seed``: the member's, for its signs and ``matched``).
        ``width`` (its features per neuron), when at most ``k``: no two features share a
        bucket, so the signed features are added in place, without two ``n x k`` buffers of
        zeros to fold into (the same numbers)."""
        gen = torch.Generator().manual_seed(SKETCH_SEED + seed)
        narrow = width is not None and width <= self.k
        keep = width is not None and 2 * self.n * width <= self.keep
        zr = None if narrow else torch.zeros_like(self.ref)
        zs = None if narrow else torch.zeros_like(self.sus)
        rr = torch.zeros(self.n, device=self.ref.device)
        ss = torch.zeros(self.n, device=self.ref.device)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        pos = d = 0
        for fr, fs in zip(ref, sus, strict=True):
            w = fr.shape[1]
            signs = (torch.randint(0, 2, (w,), generator=gen) * 2 - 1).to(fr.dtype).to(fr.device)
            xr, xs = fr * signs, fs * signs
            rr += xr.square().sum(1)
            ss += xs.square().sum(1)
            if narrow or keep:
                parts.append((xr, xs))
            if zr is not None and zs is not None:
                self._fold(zr, xr, pos)
                self._fold(zs, xs, pos)
            pos = (pos + w) % self.k
            d += w
        inv_r, inv_s = (_inv(rr) * math.sqrt(d))[:, None], (_inv(ss) * math.sqrt(d))[:, None]
        if zr is not None and zs is not None:
            self.ref.addcmul_(zr, inv_r)
            self.sus.addcmul_(zs, inv_s)
        else:
            pos = 0
            for xr, xs in parts:
                self._fold(self.ref, xr, pos, inv_r)
                self._fold(self.sus, xs, pos, inv_s)
                pos = (pos + xr.shape[1]) % self.k
        self.weight += d
        if keep:
            self.keep -= 2 * self.n * d
        self.members[seed] = (rr, ss, d, parts if keep else None)

    def _fold(self, acc: torch.Tensor, x: torch.Tensor, pos: int, scale: torch.Tensor | None = None) -> None:
        """Feature j of ``x`` (times ``scale`` per row) goes into bucket ``(pos + j) mod k``."""
        j, w, k = 0, x.shape[1], self.k
        while j < w:
            b = (pos + j) % k
            step = min(k - b, w - j)
            if scale is None:
                acc[:, b : b + step] += x[:, j : j + step]
            else:
                acc[:, b : b + step].addcmul_(x[:, j : j + step], scale)
            j += step

    def similarity(self) -> torch.Tensor:
        """The estimated ``sum_m D_m * cosine_m`` matrix."""
        return self.ref @ self.sus.T

    def matched(self, p: torch.Tensor, again: Callable[[int], tuple[Iterator[torch.Tensor], Iterator[torch.Tensor]]]) -> torch.Tensor:
        """``sum_m D_m * cosine_m(i, p[i])`` on exact features, in ``O(N D)``: from the kept
        slices (signed: the signs cancel in a product), else from ``again(seed)``'s slices."""
        out = torch.zeros(self.n, device=self.ref.device)
        for seed, (rr, ss, d, parts) in self.members.items():
            dot = torch.zeros(self.n, device=self.ref.device)
            for xr, xs in parts if parts is not None else zip(*again(seed), strict=True):
                dot += (xr * xs.index_select(0, p)).sum(1)
            out += dot * _inv(rr) * _inv(ss).index_select(0, p) * d
        return out

    @property
    def error(self) -> float:
        """Bound on the standard deviation of the estimate's error, per unit of weight."""
        return math.sqrt(2.0 / self.k)
