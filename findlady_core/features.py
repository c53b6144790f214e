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
The solver confirms a sketched assignment on exact features when a margin is within reach of
that error (``findlady_core.solver``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from findlady_core.spec import Member

CHUNK_ELEMS = 1 << 24
"""float32 values per streamed slice (64 MB): bounds the working set of one product."""

SKETCH_WIDTH = 8192
"""Buckets of a sketch: a cosine's sketch error has standard deviation below sqrt(2/8192) = 0.016."""

SKETCH_SEED = 0x5EED  # fixed: the same input gives the same sketch, so verdicts are reproducible


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
    ``ref @ sus.T`` estimates ``sum_m D_m * cosine_m``: the same weighting as exact members."""

    def __init__(self, n: int, k: int, device: torch.device) -> None:
        self.n, self.k = n, k
        self.ref = torch.zeros(n, k, device=device)
        self.sus = torch.zeros(n, k, device=device)
        self.weight = 0

    def add(self, ref: Iterator[torch.Tensor], sus: Iterator[torch.Tensor], seed: int, width: int | None = None) -> None:
        """Fold one member's slices in. ``width`` (its features per neuron), when at most ``k``:
        no two features share a bucket, so the signed features are added in place, without two
        ``n x k`` buffers of zeros to fold into (the same numbers)."""
        gen = torch.Generator().manual_seed(SKETCH_SEED + seed)
        if width is not None and width <= self.k:
            self._add_narrow(ref, sus, gen)
            return
        zr = torch.zeros_like(self.ref)
        zs = torch.zeros_like(self.sus)
        rr = torch.zeros(self.n, device=self.ref.device)
        ss = torch.zeros(self.n, device=self.ref.device)
        pos = d = 0
        for fr, fs in zip(ref, sus, strict=True):
            w = fr.shape[1]
            signs = (torch.randint(0, 2, (w,), generator=gen) * 2 - 1).to(fr.dtype).to(fr.device)
            rr += fr.square().sum(1)
            ss += fs.square().sum(1)
            self._fold(zr, fr * signs, pos)
            self._fold(zs, fs * signs, pos)
            pos = (pos + w) % self.k
            d += w
        scale = math.sqrt(d)
        self.ref.addcmul_(zr, (_inv(rr) * scale)[:, None])
        self.sus.addcmul_(zs, (_inv(ss) * scale)[:, None])
        self.weight += d

    def _add_narrow(self, ref: Iterator[torch.Tensor], sus: Iterator[torch.Tensor], gen: torch.Generator) -> None:
        parts_r, parts_s = [], []
        rr = torch.zeros(self.n, device=self.ref.device)
        ss = torch.zeros(self.n, device=self.ref.device)
        d = 0
        for fr, fs in zip(ref, sus, strict=True):
            w = fr.shape[1]
            signs = (torch.randint(0, 2, (w,), generator=gen) * 2 - 1).to(fr.dtype).to(fr.device)
            rr += fr.square().sum(1)
            ss += fs.square().sum(1)
            parts_r.append(fr * signs)
            parts_s.append(fs * signs)
            d += w
        scale = math.sqrt(d)
        inv_r, inv_s = (_inv(rr) * scale)[:, None], (_inv(ss) * scale)[:, None]
        pos = 0
        for xr, xs in zip(parts_r, parts_s, strict=True):
            j, w = 0, xr.shape[1]
            while j < w:  # feature j of the member goes into bucket (pos + j) mod k, as _fold puts it
                b = (pos + j) % self.k
                step = min(self.k - b, w - j)
                self.ref[:, b : b + step].addcmul_(xr[:, j : j + step], inv_r)
                self.sus[:, b : b + step].addcmul_(xs[:, j : j + step], inv_s)
                j += step
            pos = (pos + w) % self.k
        self.weight += d

    def _fold(self, acc: torch.Tensor, x: torch.Tensor, pos: int) -> None:
        """Feature j of ``x`` goes into bucket ``(pos + j) mod k``."""
        j, w, k = 0, x.shape[1], self.k
        while j < w:
            b = (pos + j) % k
            step = min(k - b, w - j)
            acc[:, b : b + step] += x[:, j : j + step]
            j += step

    def similarity(self) -> torch.Tensor:
        """The estimated ``sum_m D_m * cosine_m`` matrix."""
        return self.ref @ self.sus.T

    @property
    def error(self) -> float:
        """Bound on the standard deviation of the estimate's error, per unit of weight."""
        return math.sqrt(2.0 / self.k)
