"""A re-synchronized state dict that is never copied whole: tensors re-indexed on access.

Re-synchronization ends with one composed index map per permuted (tensor, axis). Applying
them to every tensor at once would hold a second copy of the model; ``PermutedStateDict``
applies them to one tensor when it is read, keeps a few recent results (integrity reads the
same tensor for several groups), and writes the model tensor by tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from findlady_core.permute import AxisKey

CACHE_BYTES = 256 * 1024 * 1024


class PermutedStateDict(Mapping[str, torch.Tensor]):
    """``base`` with ``maps[(tensor, axis)]`` applied (``t.index_select(axis, map)``) on read."""

    def __init__(self, base: Mapping[str, torch.Tensor], maps: Mapping[AxisKey, torch.Tensor],
                 cache_bytes: int = CACHE_BYTES) -> None:  # fmt: skip
        self.base = base
        self.maps: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for (name, axis), idx in maps.items():
            if not torch.equal(idx, torch.arange(idx.numel())):  # untouched axes read the base in place
                self.maps.setdefault(name, []).append((axis, idx.cpu()))
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.base[name]
        steps = self.maps.get(name)
        if not steps:
            return t
        hit = self._cache.get(name)
        if hit is not None:
            self._cache.move_to_end(name)
            return hit
        for axis, idx in steps:
            t = t.index_select(axis, idx.to(t.device))
        size = t.numel() * t.element_size()
        if size <= self.cache_bytes:
            self._cache[name] = t
            while sum(v.numel() * v.element_size() for v in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def shapes(self) -> dict[str, list[object]]:
        """``compat.shapes_of`` without reading a tensor: re-indexing keeps shapes and dtypes."""
        from findlady_core.compat import shapes_of

        return shapes_of(self.base)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the model in the suspect's dtypes, one tensor at a time (safetensors)."""
        from findlady_core.stream_io import write_safetensors

        layout = [(k, v.dtype, tuple(v.shape)) for k, v in self.base.items()]
        write_safetensors(path, layout, lambda name: self._read_once(name), metadata)

    def _read_once(self, name: str) -> torch.Tensor:
        t = self.base[name]
        for axis, idx in self.maps.get(name, []):
            t = t.index_select(axis, idx.to(t.device))
        return t


class OnDevice(Mapping[str, torch.Tensor]):
    """A lazy state dict's tensors (``null.NullStateDict``), moved to a device when read."""

    def __init__(self, base: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.base, self.device = base, device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.base[name].to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)
