"""Hugging Face model folders: read them as one state dict, write them back with the same layout.

A model folder is what ``save_pretrained`` writes: ``config.json`` (optional here) and either

* one weight file, ``model.safetensors`` (or a ``torch.save`` zip, ``pytorch_model.bin``), or
* shards (``model-00001-of-00003.safetensors``...) listed by ``model.safetensors.index.json``
  (or ``pytorch_model.bin.index.json``), whose ``weight_map`` names the shard of every tensor.

The state dict is the union of the shards, checked against the index: every name in exactly one
shard, the one the index says, and nothing extra. Every shard goes through the safe loader of
``findlady_core.io`` (header checks, no pickle); safetensors shards are memory-mapped. Other files
of the folder (tokenizer, README) are ignored. Tensor names are the names stored in the files.

Writing (``save_folder``) keeps the input's sharding, tensor names, dtypes and shard metadata,
rewrites the index and copies ``config.json``; it writes one shard at a time into a temporary
folder that is renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from findlady_core.errors import WeightsError

CONFIG = "config.json"
# Index file -> the format of its shards; then the single-file names, best first (transformers
# reads safetensors before a pickle-based .bin when both are present, and so do we).
INDEXES = {"model.safetensors.index.json": "safetensors", "pytorch_model.bin.index.json": "torch"}
SINGLES = {"model.safetensors": "safetensors", "pytorch_model.bin": "torch"}
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_SHARDS = 10_000
# A shard name is a plain file name: no folders, no hidden files, nothing a shell would expand.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class Layout:
    """How a folder stores its tensors: enough to write a changed state dict back the same way."""

    format: str  # "safetensors" or "torch"
    shards: dict[str, tuple[str, ...]]  # file name -> its tensor names, in file order
    dtypes: dict[str, torch.dtype]
    index: str | None = None  # the index file's name when the folder is sharded
    index_metadata: dict[str, Any] | None = None
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Folder:
    """A loaded model folder: its tensors, its config (None without config.json), its layout."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    layout: Layout

    @property
    def files(self) -> list[str]:
        """The files that make up the model (shards, index, config), by name."""
        names = list(self.layout.shards)
        if self.layout.index:
            names.append(self.layout.index)
        if self.config is not None:
            names.append(CONFIG)
        return names


def is_folder(path: str | Path) -> bool:
    return Path(path).is_dir()


def read_json_file(path: Path, limit: int, what: str) -> dict[str, Any]:
    """A JSON object from a small file; ``WeightsError`` naming ``what`` otherwise."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise WeightsError(f"{what} has {size} bytes, more than the limit of {limit}")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise WeightsError(f"cannot read {what}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{what} is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{what} must hold a JSON object")
    return obj


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` as a dict (read as data: nothing in it is ever imported or run)."""
    return read_json_file(Path(path), MAX_CONFIG_BYTES, CONFIG)


def read_index(path: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The index's ``weight_map`` (tensor -> shard file name) and its ``metadata``."""
    obj = read_json_file(path, MAX_INDEX_BYTES, path.name)
    wmap, meta = obj.get("weight_map"), obj.get("metadata")
    if not isinstance(wmap, dict) or not wmap:
        raise WeightsError(f"{path.name} must have a non-empty object 'weight_map' (tensor name -> shard file)")
    for k, v in wmap.items():
        if not isinstance(v, str) or not SHARD_NAME.fullmatch(v):
            raise WeightsError(f"{path.name}: tensor {str(k)[:100]!r} maps to {str(v)[:100]!r}, not a plain file name")
    if meta is not None and not isinstance(meta, dict):
        raise WeightsError(f"{path.name}: 'metadata' must be an object")
    if len(set(wmap.values())) > MAX_SHARDS:
        raise WeightsError(f"{path.name} lists more than {MAX_SHARDS} shards")
    return wmap, meta


def _find(path: Path) -> tuple[str, str | None, list[str]]:
    """(format, index name or None, weight files) of a folder, or a ``WeightsError`` saying what is missing."""
    for name, fmt in INDEXES.items():
        if (path / name).is_file():
            return fmt, name, []
    for name, fmt in SINGLES.items():
        if (path / name).is_file():
            return fmt, None, [name]
    found = sorted(p.name for p in path.iterdir())[:20]
    raise WeightsError(
        f"folder {path.name} holds no model weights: expected model.safetensors, pytorch_model.bin, or shards "
        f"with model.safetensors.index.json (found: {', '.join(found) or 'nothing'})"
    )


def load_folder(path: str | Path, *, max_bytes: int | None = None, max_entries: int = 100_000) -> Folder:
    """Load a model folder (see the module docstring). ``max_bytes`` bounds the shards' total size."""
    from findlady_core.io import _check_tensors, load_weight_file

    path = Path(path)
    fmt, index, files = _find(path)
    wmap: dict[str, str] | None = None
    index_meta = None
    if index is not None:
        wmap, index_meta = read_index(path / index)
        files = sorted(set(wmap.values()))
    config = read_config(path / CONFIG) if (path / CONFIG).is_file() else None

    sd: dict[str, torch.Tensor] = {}
    shards: dict[str, tuple[str, ...]] = {}
    shard_meta: dict[str, dict[str, str]] = {}
    where: dict[str, str] = {}
    left = max_bytes
    for name in files:
        f = path / name
        if not f.is_file():
            raise WeightsError(f"{index}: shard {name} is missing from the folder")
        if left is not None:
            left -= f.stat().st_size
            if left < 0:
                raise WeightsError(f"folder {path.name}: the shards hold more than the limit of {max_bytes} bytes")
        part = load_weight_file(f, max_entries=max_entries, mmap=True)
        if fmt == "safetensors":
            meta = _safetensors_metadata(f)
            if meta:
                shard_meta[name] = meta
        for k, t in part.items():
            if k in where:
                raise WeightsError(f"folder {path.name}: tensor {k[:100]!r} is in both {where[k]} and {name}")
            if wmap is not None and wmap.get(k) != name:
                said = wmap.get(k)
                raise WeightsError(
                    f"{index}: tensor {k[:100]!r} is stored in {name} but the index "
                    + (f"puts it in {said}" if said else "does not list it")
                )
            where[k] = name
            sd[k] = t
        shards[name] = tuple(part)
        if len(sd) > max_entries:
            raise WeightsError(f"folder {path.name}: more than {max_entries} tensors")
    if wmap is not None:
        missing = [k for k in wmap if k not in sd]
        if missing:
            raise WeightsError(
                f"{index}: {len(missing)} tensor(s) it lists are in no shard, e.g. {missing[0][:100]!r} "
                f"(expected in {wmap[missing[0]]})"
            )
    _check_tensors(sd, path.name, max_entries)
    layout = Layout(fmt, shards, {k: t.dtype for k, t in sd.items()}, index, index_meta, shard_meta)
    return Folder(path, sd, config, layout)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_folder(
    state_dict: Mapping[str, torch.Tensor], out: str | Path, like: Folder, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as a folder laid out like ``like`` (shards, names, dtypes, config).

    ``out`` must not exist or be an empty folder. ``metadata`` is added to every safetensors
    shard's own. The folder appears complete or not at all.
    """
    out = Path(out)
    lay = like.layout
    expected = {k for names in lay.shards.values() for k in names}
    if set(state_dict) != expected:
        extra = sorted(set(state_dict) - expected)[:3]
        gone = sorted(expected - set(state_dict))[:3]
        raise WeightsError(f"cannot write the folder like {like.path.name}: tensors differ (new {extra}, missing {gone})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightsError(f"cannot write the folder {out}: it exists and is not an empty folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    try:
        total = 0
        for shard, names in lay.shards.items():  # one shard in memory at a time
            tensors = {k: state_dict[k].detach().to("cpu", lay.dtypes[k]).contiguous().clone() for k in names}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            if lay.format == "safetensors":
                from safetensors.torch import save_file

                meta = {**lay.shard_metadata.get(shard, {}), **(metadata or {})}
                save_file(tensors, str(tmp / shard), metadata=meta or None)
            else:
                torch.save(tensors, tmp / shard)
            del tensors
        if lay.index:
            index = {"metadata": {**(lay.index_metadata or {}), "total_size": total},
                     "weight_map": {k: s for s, names in lay.shards.items() for k in names}}
            (tmp / lay.index).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if like.config is not None:
            shutil.copyfile(like.path / CONFIG, tmp / CONFIG)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.replace(tmp, out)  # onto a missing path or an empty folder: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_sha256(path: str | Path, files: list[str] | None = None) -> str:
    """Hex SHA-256 of a folder's model files: over the sorted lines ``name NUL file-sha256``.

    The same files give the same hash whatever else sits in the folder (a tokenizer, a README)."""
    from findlady_core.io import file_sha256

    path = Path(path)
    names = files if files is not None else load_folder_files(path)
    return manifest_sha256({n: file_sha256(path / n) for n in names})


def manifest_sha256(hashes: Mapping[str, str]) -> str:
    """The folder hash from its files' hashes (``folder_sha256`` without reading the files)."""
    h = hashlib.sha256(b"findlady.folder/1\n")
    for name in sorted(hashes):
        h.update(f"{name}\0{hashes[name]}\n".encode())
    return h.hexdigest()


def load_folder_files(path: Path) -> list[str]:
    """The names of a folder's model files, from its index or single weight file and config."""
    fmt, index, files = _find(path)
    if index is not None:
        files = sorted(set(read_index(path / index)[0].values())) + [index]
    if (path / CONFIG).is_file():
        files = [*files, CONFIG]
    return files
