"""Large weight files without copies: memory-mapped reading, tensor-by-tensor writing.

A 1.1B-parameter model is 2.2 GB in bf16; reading it with ``pread`` puts a private copy of every
byte in the process, and writing a re-synchronized copy through ``safetensors.save_file`` needs
the whole output dict in memory first. Here:

* ``map_safetensors`` maps the file (``MAP_PRIVATE``) and returns tensors that are views of the
  mapping: pages are read on first touch, shared with the page cache, and never written back
  (an in-place change of a tensor copies that page privately; the file stays as it was). The
  header is checked first by ``io.read_safetensors_header``, then the mapped header is compared
  with the checked one (the file must not have changed in between). Floating tensors are
  checked for NaN and Inf here, a slice at a time, and their pages are released from the
  process after the check (``MADV_DONTNEED``): loading a 2 GB file costs no resident memory
  until the tensors are used (the service validates uploads this way).
* ``write_safetensors`` writes the safetensors format from a header computed up front and one
  tensor at a time from a callable, so the peak is one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from findlady_core.errors import WeightsError

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def map_safetensors(path: str | Path, checked: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Zero-copy tensors of a safetensors file whose header ``checked`` was already validated.

    A tensor whose offset is not a multiple of its element size cannot be a view (torch needs
    aligned storage offsets): that one is copied out of the mapping instead.
    """
    path = Path(path)
    name = path.name
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise WeightsError(f"{name}: the file changed while it was being read")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    (n,) = struct.unpack("<Q", mm[:8])
    try:
        obj = json.loads(mm[8 : 8 + n].decode("utf-8"))
        obj.pop("__metadata__", None)
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise WeightsError(f"{name}: the file changed while it was being read") from None
    if not isinstance(obj, dict) or set(obj) != set(checked):
        raise WeightsError(f"{name}: the file changed while it was being read")
    whole = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive as long as a view lives
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for key, (dtype, shape) in checked.items():
        info = obj[key]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        begin, end = info.get("data_offsets", (None, None)) if isinstance(info, dict) else (None, None)
        if (
            _CODES.get(dtype) != info.get("dtype") or tuple(info.get("shape", ())) != shape
            or not isinstance(begin, int) or not isinstance(end, int)
            or end - begin != math.prod(shape) * itemsize or base + end > size or begin < 0
        ):
            raise WeightsError(f"{name}: the file changed while it was being read (tensor {key!r})")
        raw = whole[base + begin : base + end]
        if (base + begin) % itemsize:
            raw = raw.clone()  # unaligned: a view of another dtype is impossible here
        t = raw.view(dtype).view(shape) if shape else raw.view(dtype).reshape(())
        if t.is_floating_point():
            _check_finite(t, f"{name}: tensor {key[:100]!r}")
            _release(mm, base + begin, base + end)
        out[key] = t
    return out


FINITE_SLICE = 1 << 24  # elements per isfinite call: its bool mask stays small


def _check_finite(t: torch.Tensor, where: str) -> None:
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), FINITE_SLICE):
        lo, hi = torch.aminmax(flat[start : start + FINITE_SLICE])  # NaN and Inf reach the extremes
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            nan = int(torch.isnan(flat).sum())
            inf = int(torch.isinf(flat).sum())
            raise WeightsError(f"{where} has non-finite values ({nan} NaN, {inf} Inf)")


def _release(mm: mmap.mmap, begin: int, end: int) -> None:
    """Drop the whole pages of ``[begin, end)`` from this process (they are still unmodified,
    so they are read again from the page cache or the file when touched)."""
    page = mmap.PAGESIZE
    lo, hi = -(-begin // page) * page, end // page * page
    if hi > lo and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def write_safetensors(
    path: str | Path,
    layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor: ``layout`` lists (name, dtype, shape) in file
    order and ``produce(name)`` returns each tensor when it is written (then it is dropped).

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for name, dtype, shape in layout:
        if dtype not in _CODES:
            raise WeightsError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data region starts 8-byte aligned, as safetensors writes it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, dtype, shape in layout:
                t = produce(name)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise WeightsError(f"tensor {name!r} changed shape or dtype while it was written")
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
                del t
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
