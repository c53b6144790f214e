"""Safe weight I/O: load untrusted weight files into a flat ``dict[str, Tensor]``.

Weight files come from strangers. The format is read from the file's
magic bytes, never from its name:

* safetensors: the header is parsed and checked here (length, JSON, dtypes, shapes, offsets)
  before the library sees it, so a truncated or lying file is refused with a precise reason;
* PyTorch zip checkpoints (``torch.save``): the archive is checked first (stored entries only,
  bounded count and size, only the names ``torch.save`` writes) and then read with
  ``torch.load(weights_only=True)``, whose unpickler only builds tensors and plain containers;
* plain pickle, TorchScript archives and anything else are refused: they can run code.

Every loaded tensor is then checked: a supported dtype, dense, on the CPU, finite when floating.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from findlady_core.errors import WeightsError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_NAME_CHARS = 1024
# Extra bytes a zip archive may hold beyond its members' data (headers, central directory,
# alignment padding of 64 bytes per member) before we call the sizes inconsistent.
ZIP_SLACK_BYTES = 1 << 20

# safetensors dtype code -> (torch dtype, bytes per element). Only dtypes the rest of the
# code base can compute with; float8/4/6 and complex are refused with a clear reason.
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_ALLOWED_DTYPES = {d for d, _ in _ST_DTYPES.values()}

# Member names torch.save (2.x) writes below the archive's root folder.
_ZIP_NAME = re.compile(
    r"(data\.pkl|byteorder|version|\.format_version|\.storage_alignment"
    r"|\.data/version|\.data/serialization_id|data/[0-9]{1,12})"
)

_BOILERPLATE = ("weights only load failed", "check the documentation", "in pytorch 2.6")


def load_state_dict(
    path: str | Path, *, max_bytes: int | None = None, max_entries: int = 100_000, mmap: bool = False
) -> dict[str, torch.Tensor]:
    """Load a safetensors file, a PyTorch zip checkpoint or a model folder (config.json and
    model.safetensors or shards with their index: ``findlady_core.folders``) as a flat
    name -> tensor dict.

    ``max_bytes`` bounds the file size (and a zip's unpacked size), ``max_entries`` the number
    of tensors (and zip members). With ``mmap``, safetensors tensors are zero-copy views of a
    private memory map (``findlady_core.stream_io``): for large models, whose bytes then stay in
    the page cache instead of a copy in the process. Raises ``WeightsError`` naming the problem.
    """
    path = Path(path)
    if path.is_dir():  # a Hugging Face model folder: the union of its shards, checked against the index
        from findlady_core.folders import load_folder

        return load_folder(path, max_bytes=max_bytes, max_entries=max_entries).state_dict
    return load_weight_file(path, max_bytes=max_bytes, max_entries=max_entries, mmap=mmap)


def load_weight_file(
    path: str | Path, *, max_bytes: int | None = None, max_entries: int = 100_000, mmap: bool = False
) -> dict[str, torch.Tensor]:
    """``load_state_dict`` for one file (``mmap``: map a safetensors file instead of reading it)."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise WeightsError(f"{path.name} is not a regular file")
        size = st.st_size
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise WeightsError(f"cannot read weight file {path.name}: {e.strerror}") from None
    if size == 0:
        raise WeightsError(f"{path.name} is empty")
    if max_bytes is not None and size > max_bytes:
        raise WeightsError(f"{path.name} has {size} bytes, more than the limit of {max_bytes}")

    if head.startswith(b"PK\x03\x04"):
        sd = _load_torch_zip(path, max_bytes, max_entries)
    elif len(head) == 9 and head[8:9] == b"{":
        sd = _load_safetensors(path, size, max_entries, mmap=mmap)
    elif head.startswith(b"\x80"):
        raise WeightsError(
            f"{path.name} is a plain pickle file (or a legacy torch.save file): plain pickle files "
            "are refused because they can run code; save with safetensors"
        )
    else:
        raise WeightsError(
            f"{path.name} is not a recognized weight file: expected safetensors or a PyTorch zip "
            "checkpoint (torch.save)"
        )
    _check_tensors(sd, path.name, max_entries, check_finite=not (mmap and not head.startswith(b"PK")))
    return sd


# ---------------------------------------------------------------- safetensors


def _load_safetensors(path: Path, size: int, max_entries: int, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    name = path.name
    header = read_safetensors_header(path, size=size, max_entries=max_entries)
    if mmap:
        from findlady_core.stream_io import map_safetensors

        return map_safetensors(path, header)
    from safetensors import safe_open

    try:
        try:
            # pread copies the bytes: the tensors do not alias a file that may change later.
            # With ``mmap`` (model folder shards, large uploads) the file was mapped above instead
            # (``stream_io.map_safetensors``): private copy-on-write pages, never read twice.
            handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
        except TypeError:  # older safetensors without the backend argument
            handle = safe_open(str(path), framework="pt", device="cpu")
        with handle as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the library's own checks, after ours
        raise WeightsError(f"{name}: safetensors refused the file: {_first_line(e)}") from None
    # The file is read twice (header here, data by the library): make sure both saw the same.
    if set(sd) != set(header):
        raise WeightsError(f"{name}: the file changed while it was being read")
    for k, (dtype, shape) in header.items():
        t = sd[k]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise WeightsError(f"{name}: the file changed while it was being read (tensor {k!r})")
    return sd


def read_safetensors_header(
    path: str | Path, *, size: int | None = None, max_entries: int = 100_000
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parse and check a safetensors header; return name -> (dtype, shape).

    Checks: header length within the file and at most ``MAX_HEADER_BYTES``; valid UTF-8 JSON
    object without duplicate keys; known dtypes; non-negative integer shapes; each tensor's
    byte range matching dtype*shape; the ranges disjoint and together covering the data
    region exactly (what the safetensors format requires).
    """
    path = Path(path)
    name = path.name
    if size is None:
        size = path.stat().st_size
    if size < 8:
        raise WeightsError(f"{name}: safetensors file too short ({size} bytes) to hold a header length")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise WeightsError(f"{name}: safetensors header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if n > size - 8:
            raise WeightsError(
                f"{name}: safetensors header length {n} is larger than the rest of the file "
                f"({size - 8} bytes): the file is truncated or corrupt"
            )
        raw = f.read(n)
    data_len = size - 8 - n
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise WeightsError(f"{name}: safetensors header lists {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{name}: safetensors header is not valid JSON: {_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{name}: safetensors header must be a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise WeightsError(f"{name}: safetensors __metadata__ must map strings to strings")
    if len(obj) > max_entries:
        raise WeightsError(f"{name}: {len(obj)} tensors, more than the limit of {max_entries}")

    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    ranges: list[tuple[int, int, str]] = []
    for key, info in obj.items():
        where = f"{name}: tensor {key[:100]!r}"
        if not key or len(key) > MAX_NAME_CHARS:
            raise WeightsError(f"{name}: tensor names must have 1 to {MAX_NAME_CHARS} characters")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"{where}: entry must be an object with exactly dtype, shape and data_offsets")
        code, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if code == "C64" or (isinstance(code, str) and code.startswith("C")):
            raise WeightsError(f"{where}: complex tensors are refused")
        if code not in _ST_DTYPES:
            raise WeightsError(
                f"{where}: dtype {str(code)[:20]!r} is not supported (supported: {', '.join(_ST_DTYPES)})"
            )
        if not isinstance(shape, list) or len(shape) > 64 or not all(_is_nat(s) for s in shape):
            raise WeightsError(f"{where}: shape must be a list of at most 64 non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_nat(o) for o in offs)):
            raise WeightsError(f"{where}: data_offsets must be two non-negative integers")
        dtype, itemsize = _ST_DTYPES[code]
        begin, end = offs
        nbytes = math.prod(shape) * itemsize
        if end < begin or end - begin != nbytes:
            raise WeightsError(
                f"{where}: data_offsets [{begin}, {end}) hold {end - begin} bytes but dtype {code} "
                f"and shape {shape} need {nbytes}"
            )
        if end > data_len:
            raise WeightsError(
                f"{where}: data_offsets [{begin}, {end}) run past the data region of {data_len} bytes "
                "(file truncated or offsets out of bounds)"
            )
        ranges.append((begin, end, key))
        out[key] = (dtype, tuple(shape))

    # Sorted by start, each range must begin where the previous one ended: no overlap, no gap.
    ranges.sort()
    pos, prev = 0, None
    for begin, end, key in ranges:
        if begin < pos:
            raise WeightsError(f"{name}: tensors {prev!r} and {key!r} overlap in the data region")
        if begin > pos:
            raise WeightsError(f"{name}: unused bytes [{pos}, {begin}) in the data region before tensor {key!r}")
        pos, prev = end, key
    if pos != data_len:
        raise WeightsError(
            f"{name}: the tensors cover {pos} bytes but the data region has {data_len}: "
            "trailing bytes or a corrupt header"
        )
    return out


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    d: dict[str, object] = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def _is_nat(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << 62)


# ---------------------------------------------------------------- torch zip


def check_torch_zip(
    file: BinaryIO, name: str, *, max_bytes: int | None = None, max_entries: int = 100_000
) -> None:
    """Check an open ``torch.save`` zip archive before unpickling anything from it.

    Refuses compressed members (zip bombs), too many or too large members, duplicate names,
    absolute or ``..`` paths, more than one root folder, TorchScript archives, and any name
    ``torch.save`` does not write. ``name`` is only used in messages.
    """
    size = os.fstat(file.fileno()).st_size
    try:
        file.seek(0)
        with zipfile.ZipFile(file) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise WeightsError(f"{name}: not a readable zip archive: {_first_line(e)}") from None
    if not infos:
        raise WeightsError(f"{name}: the zip archive is empty")
    if len(infos) > max_entries:
        raise WeightsError(f"{name}: the archive has {len(infos)} entries, more than the limit of {max_entries}")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise WeightsError(f"{name}: the archive lists the same member twice")
    for n in names:
        if n.startswith("/") or "\\" in n or ".." in n.split("/") or re.match(r"[A-Za-z]:", n):
            raise WeightsError(f"{name}: archive member {n[:200]!r} has an absolute or parent path")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise WeightsError(f"{name}: archive members must all sit under one top-level folder")
    root = roots.pop()
    rels = [n[len(root) + 1:] for n in names]
    if any(r == "constants.pkl" or r.startswith("code/") for r in rels):
        raise WeightsError(
            f"{name} is a TorchScript archive: refused because it holds code; save the state dict "
            "with safetensors"
        )
    for n, r in zip(names, rels):
        if not _ZIP_NAME.fullmatch(r):
            raise WeightsError(f"{name}: unexpected archive member {n[:200]!r} (not written by torch.save)")
    if "data.pkl" not in rels:
        raise WeightsError(f"{name}: the archive has no data.pkl: not a torch.save checkpoint")
    total = 0
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            raise WeightsError(
                f"{name}: archive member {i.filename[:200]!r} is compressed; only stored (uncompressed) "
                "members are accepted, as torch.save writes them"
            )
        if i.compress_size != i.file_size:
            raise WeightsError(f"{name}: archive member {i.filename[:200]!r} has inconsistent sizes")
        total += i.file_size
    if total > size + ZIP_SLACK_BYTES:
        raise WeightsError(f"{name}: the archive claims {total} unpacked bytes but the file has only {size}")
    if max_bytes is not None and total > max_bytes:
        raise WeightsError(f"{name}: the archive unpacks to {total} bytes, more than the limit of {max_bytes}")


def _load_torch_zip(path: Path, max_bytes: int | None, max_entries: int) -> dict[str, torch.Tensor]:
    name = path.name
    # One open file for the check and the load: what was checked is what gets unpickled.
    # (A file object also stops torch.load from dispatching on a ".safetensors" suffix.)
    try:
        with path.open("rb") as f:
            check_torch_zip(f, name, max_bytes=max_bytes, max_entries=max_entries)
            f.seek(0)
            obj = torch.load(f, weights_only=True, map_location="cpu", mmap=False)
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(
            f"{name}: torch.load(weights_only=True) refused the checkpoint: {_torch_reason(e)}. "
            "Only tensors and plain containers are accepted; save with safetensors"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not isinstance(obj, dict):
        raise WeightsError(f"{name}: the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise WeightsError(f"{name}: the checkpoint has a non-string key {str(k)[:100]!r}")
        if not isinstance(v, torch.Tensor):
            raise WeightsError(
                f"{name}: entry {k[:100]!r} is a {type(v).__name__}, not a tensor (a flat state dict is expected)"
            )
        sd[k] = v.detach() if isinstance(v, torch.nn.Parameter) else v
    return sd


def _torch_reason(e: BaseException) -> str:
    """The informative line of a torch.load error (skipping its advice to disable weights_only)."""
    for line in str(e).splitlines():
        s = line.strip()
        if s and not s.lower().startswith(_BOILERPLATE):
            return s[:300].rstrip(".")
    return type(e).__name__


# ---------------------------------------------------------------- tensor checks


def _check_tensors(sd: Mapping[str, torch.Tensor], name: str, max_entries: int, check_finite: bool = True) -> None:
    if not sd:
        raise WeightsError(f"{name} holds no tensors")
    if len(sd) > max_entries:
        raise WeightsError(f"{name}: {len(sd)} tensors, more than the limit of {max_entries}")
    for k, t in sd.items():
        if not isinstance(k, str) or not k or len(k) > MAX_NAME_CHARS:
            raise WeightsError(f"{name}: tensor names must be strings of 1 to {MAX_NAME_CHARS} characters")
        where = f"{name}: tensor {k[:100]!r}"
        if t.is_complex():
            raise WeightsError(f"{where} is complex ({t.dtype}); complex tensors are refused")
        if t.is_quantized:
            raise WeightsError(f"{where} is quantized ({t.dtype}); quantized tensors are refused")
        if t.layout != torch.strided:
            raise WeightsError(f"{where} has layout {t.layout}; only dense tensors are accepted")
        if t.device.type != "cpu":
            raise WeightsError(f"{where} is on device {t.device.type}; only real CPU tensors are accepted")
        if t.dtype not in _ALLOWED_DTYPES:
            raise WeightsError(f"{where} has unsupported dtype {t.dtype}")
        # A view may claim far more elements than its storage holds (stride 0): refuse it,
        # or the first elementwise operation would allocate the claimed size.
        if t.numel() and t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise WeightsError(f"{where}: shape {tuple(t.shape)} needs more memory than its storage holds")
        if check_finite and t.is_floating_point() and t.numel():  # (a mapped file was checked as it was mapped)
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                nan = int(torch.isnan(t).sum())
                inf = t.numel() - int(finite.sum()) - nan
                raise WeightsError(f"{where} has non-finite values ({nan} NaN, {inf} Inf)")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


# ---------------------------------------------------------------- saving and helpers


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
    *, like: Any = None,
) -> None:
    """Save a flat state dict: ``.pt`` suffix -> ``torch.save`` of a plain dict, else safetensors.
    With ``like`` (a model folder, or its loaded ``folders.Folder``), write a folder laid out as that one (``folders.save_folder``:
    same shards, names, dtypes and config).

    Tensors are copied to contiguous CPU clones, so shared or strided storages are fine. The
    file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    if like is not None:
        from findlady_core.folders import Folder, load_folder, save_folder

        save_folder(state_dict, path, like if isinstance(like, Folder) else load_folder(like), metadata)
        return
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise WeightsError("save_state_dict needs a non-empty mapping of names to tensors")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightsError("metadata must map strings to strings")
    clean: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not isinstance(k, str) or not k:
            raise WeightsError(f"tensor names must be non-empty strings, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"entry {k!r} is a {type(v).__name__}, not a tensor")
        clean[k] = v.detach().to("cpu").contiguous().clone()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".pt":
            torch.save(clean, tmp)
        else:
            from safetensors.torch import save_file

            save_file(clean, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weight files can be large); of a model folder,
    ``folders.folder_sha256`` (over its model files' hashes)."""
    if Path(path).is_dir():
        from findlady_core.folders import folder_sha256

        return folder_sha256(path)
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's content (names, dtypes, shapes, bytes, in name order);
    used when the caller has no file hash."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def count_parameters(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of floating-point elements (integer buffers are not parameters)."""
    return sum(t.numel() for t in state_dict.values() if t.is_floating_point())
