"""The reference's null: how far the solver lifts structureless weights of its architecture.

``reference_null`` re-synchronizes the reference against a structureless model of the same
shapes and takes the report's mean margin (``report.mean_margins``). The structureless model is
``NullStateDict``: every floating tensor's entries are independent draws from that tensor's own
values, produced when the solver reads the tensor. Nothing the size of the model is built: a
tensor's draws depend only on ``NULL_SEED`` and the tensor's name (so the order in which the
solver reads tensors does not matter, and a tensor read twice is the same tensor), and at most
``CACHE_BYTES`` of drawn tensors are kept between reads.

Draws are taken from a table of at most ``TABLE_SIZE`` of the tensor's values (all of them for a
smaller tensor; a seeded sample of positions otherwise): a gather from a table that sits in the
cache costs a fraction of a random permutation of the whole tensor (about 6x less on a
23M-value embedding table) and of the random reads a permutation makes. Drawing with
replacement from a tensor's values is a shuffle of them up to repetitions; for the solver both
are structureless features with the tensor's distribution of values (docs/verdict.md compares
the two nulls on every bundled model).

The null runs the same solver as ``verify``, except that it compares members on exact
features from the start: a sketch never passes its confirmation on structureless features
(every margin is within the sketch's error), so sketching the null only adds its cost to the
exact solve that follows. Its assignments on groups of 1024 neurons or more are solved among
each row's and column's ``CANDIDATES`` largest similarities (``assignment._assign``): on
structureless weights a dense assignment of 3072 neurons is the null's largest cost, and its
matched entries rank below 40 in their rows and columns (measured on BERT-base), so the sparse
solve gives the same bijection at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from findlady_core.progress import Progress, as_callback, renamed
from findlady_core.resync import resync

NULL_SEED = 0  # the draws behind ``reference_null``: fixed, so a verdict is reproducible
TABLE_SIZE = 1 << 16
"""Values a tensor's draws are taken from: all of a smaller tensor's, else a seeded sample."""
CANDIDATES = 48
"""A large group's assignment is solved among each row's and column's 48 best entries."""
CACHE_BYTES = 256 * 1024 * 1024
"""Drawn tensors kept between reads (a group's members are read several times per solve)."""


def tensor_seed(name: str, seed: int = NULL_SEED) -> int:
    """A tensor's own seed: from ``seed`` and the tensor's name alone."""
    digest = hashlib.sha256(f"findlady.null/1\0{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw(t: torch.Tensor, name: str, seed: int = NULL_SEED) -> torch.Tensor:
    """Tensor ``name``'s structureless counterpart: its shape and dtype, entries drawn
    independently from its own values (``t`` itself when not floating point or empty)."""
    if not t.is_floating_point() or t.numel() == 0:
        return t
    g = torch.Generator().manual_seed(tensor_seed(name, seed))
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= TABLE_SIZE:
        table = flat.cpu()
    else:
        table = flat.cpu()[torch.randint(0, n, (TABLE_SIZE,), generator=g)]
    # int32 picks: the same numbers as int64 ones from the generator, drawn and gathered 2.8x faster
    picks = torch.randint(0, table.numel(), (n,), generator=g, dtype=torch.int32)
    return table.index_select(0, picks).view(t.shape).to(t.device)


class NullStateDict(Mapping[str, torch.Tensor]):
    """``reference`` with every floating tensor replaced by ``draw`` when it is read."""

    lazy = True  # ``solver.Work`` reads it per access instead of holding every tensor

    def __init__(self, reference: Mapping[str, torch.Tensor], seed: int = NULL_SEED,
                 cache_bytes: int = CACHE_BYTES) -> None:  # fmt: skip
        self.reference, self.seed, self.cache_bytes = reference, seed, cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        hit = self._cache.get(name)
        if hit is not None:
            self._cache.move_to_end(name)
            return hit
        t = self.reference[name]
        out = draw(t, name, self.seed)
        if out is t:
            return t
        size = out.numel() * out.element_size()
        if size <= self.cache_bytes:
            self._cache[name] = out
            self._bytes += size
            while self._bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.reference)

    def __len__(self) -> int:
        return len(self.reference)

    def shape(self, name: str) -> torch.Size:
        """A tensor's shape without drawing it."""
        return self.reference[name].shape

    def shapes(self) -> dict[str, list[object]]:
        """``compat.shapes_of`` without drawing a tensor: draws keep shapes and dtypes."""
        from findlady_core.compat import shapes_of

        return shapes_of(self.reference)


def reference_null(
    reference: Mapping[str, torch.Tensor], spec: Any, *, device: str = "auto", ignore: Any = (),
    progress: bool | Progress | None = None,
) -> float:
    """Mean margin of the reference against its structureless counterpart (``NullStateDict``):
    how far the solver lifts structureless weights on this architecture. Depends on the
    reference alone, so a service can compute it once when the reference is registered.
    ``progress`` hears phase ``null``."""
    from findlady_core.report import mean_margins

    r = resync(reference, NullStateDict(reference), spec, device=device, ignore=ignore, sketch=False,
               candidates=CANDIDATES, progress=renamed(as_callback(progress), "null"))
    return mean_margins(r)[0]
