"""The weights of one upload: a single file as before, or a model folder sent in parts.

A request carries the model in one of three forms (multipart fields):

* the single file (``weights`` once for a reference, ``suspect`` for a verification);
* ``weights`` repeated, one part per shard (named as the index names them), with optional
  ``index`` (model.safetensors.index.json) and ``config`` (config.json);
* one ``archive``: a ``.zip`` or ``.tar`` of the folder (``app.archives`` unpacks it safely).

A folder is assembled in a private staging folder, loaded with the core's folder reader (every
tensor in exactly one shard, as the index says), pruned to its model files and stored as one
content-addressed folder blob. Nothing is left behind on a refusal: the caller discards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.blobs import TempBlob, discard_folder
from app.errors import ApiError
from app.runtime import Runtime
from app.uploads import Form

if TYPE_CHECKING:  # the API imports torch only when a model is read (idle RSS without it: see test_layers)
    import torch

FOLDER_FIELDS = ("weights", "index", "config", "archive")


@dataclass
class ModelUpload:
    """A single uploaded file (``file``) or a staged model folder (``folder`` with its files' hashes)."""

    field: str  # named in messages
    file: TempBlob | None = None
    folder: Path | None = None
    hashes: dict[str, str] | None = None
    config: dict[str, Any] | None = None

    folder_size: int = 0  # bytes of the folder's model files, known once loaded

    @property
    def size(self) -> int:
        return self.file.size if self.file is not None else self.folder_size

    def load(self, runtime: Runtime) -> dict[str, torch.Tensor]:
        """Parse and check the weights (422 naming the field); a folder is also pruned to its
        model files and its config kept."""
        from findlady_core.errors import InputError
        from findlady_core.folders import load_folder
        from findlady_core.io import load_state_dict

        cap = runtime.settings.max_upload_bytes
        try:
            if self.file is not None:
                return load_state_dict(self.file.path, max_bytes=cap, mmap=True)  # the API does not grow with the file
            assert self.folder is not None and self.hashes is not None
            folder = load_folder(self.folder, max_bytes=cap)
        except InputError as e:
            hidden = (self.file.path.name if self.file is not None else self.folder.name if self.folder else "")
            message = str(e).replace(hidden, repr(self.field)) if hidden else str(e)
            raise ApiError(422, getattr(e, "code", "bad_weights"), f"{self.field}: {message}") from None
        keep = set(folder.files)
        for p in list(self.folder.iterdir()):
            if p.name not in keep:  # an unused shard or a second format: not part of the model
                p.unlink()
                self.hashes.pop(p.name, None)
        self.config = folder.config
        self.folder_size = sum((self.folder / n).stat().st_size for n in self.hashes)
        return folder.state_dict

    def commit(self, runtime: Runtime) -> tuple[str, bool]:
        from findlady_core.folders import manifest_sha256

        if self.file is not None:
            return runtime.blobs.commit(self.file)
        assert self.folder is not None and self.hashes is not None
        sha, created = runtime.blobs.commit_folder(self.folder, manifest_sha256(self.hashes))
        self.folder = None
        return sha, created

    def discard(self) -> None:
        if self.folder is not None:
            discard_folder(self.folder)
            self.folder = None


def collect(runtime: Runtime, form: Form, single: str) -> ModelUpload:
    """The model of a request: ``form.files[single]``, or a folder from the parts of
    ``FOLDER_FIELDS`` (422 when the forms are mixed or none is given)."""
    weights = form.lists.get("weights", [])
    index, config, archive = (form.files.get(n) for n in ("index", "config", "archive"))
    one = form.files.get(single) if single != "weights" else None
    if single == "weights" and len(weights) == 1 and index is None and config is None and archive is None:
        return ModelUpload("weights", file=weights[0])
    if one is not None:
        if weights or index or config or archive:
            raise ApiError(422, "mixed_fields", f"send either {single!r} or the folder fields "
                           f"({', '.join(FOLDER_FIELDS)}), not both")
        return ModelUpload(single, file=one)
    if archive is not None:
        if weights or index or config:
            raise ApiError(422, "mixed_fields", "send either 'archive' or the parts 'weights', 'index', 'config', not both")
        return _from_archive(runtime, archive)
    if not weights:
        what = "'weights' (the model's weight file or its shards)" if single == "weights" else f"{single!r}"
        raise ApiError(422, "missing_field", f"form field {what} is required (or 'archive': a zip or tar of the folder)")
    return _from_parts(runtime, weights, index, config)


def _from_archive(runtime: Runtime, archive: TempBlob) -> ModelUpload:
    from app.archives import unpack
    from findlady_core.errors import InputError

    staging = runtime.blobs.new_staging()
    try:
        hashes = unpack(archive.path, staging, max_bytes=runtime.settings.max_upload_bytes)
    except InputError as e:
        discard_folder(staging)
        raise ApiError(422, getattr(e, "code", "bad_archive"), f"archive: {e}") from None
    except BaseException:
        discard_folder(staging)
        raise
    return ModelUpload("archive", folder=staging, hashes=hashes)


def _from_parts(runtime: Runtime, weights: list[TempBlob], index: TempBlob | None, config: TempBlob | None) -> ModelUpload:
    from findlady_core.folders import INDEXES, SHARD_NAME, SINGLES

    names: dict[str, TempBlob] = {}
    if index is not None:
        index_name = index.filename if index.filename in INDEXES else next(iter(INDEXES))
        names[index_name] = index
        for w in weights:
            name = w.filename or ""
            if not SHARD_NAME.fullmatch(name) or name in INDEXES or name == "config.json":
                raise ApiError(422, "bad_weights", f"weights: part file name {name[:200]!r} is not a shard file name "
                               "(the index names each shard's file)")
            if name in names:
                raise ApiError(422, "duplicate_field", f"weights: shard {name!r} was sent twice")
            names[name] = w
    elif len(weights) > 1:
        raise ApiError(422, "missing_field", "several 'weights' parts (shards) need the 'index' part "
                       "(model.safetensors.index.json) that says which tensor is in which")
    else:
        with weights[0].path.open("rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        names[[n for n, fmt in SINGLES.items() if fmt == ("torch" if is_zip else "safetensors")][0]] = weights[0]
    if config is not None:
        names["config.json"] = config
    staging = runtime.blobs.new_staging()
    try:
        for name, blob in names.items():
            blob.finish()
            os.replace(blob.path, staging / name)  # the same file system: a rename, no copy
    except BaseException:
        discard_folder(staging)
        raise
    return ModelUpload("weights", folder=staging, hashes={n: b.sha256 for n, b in names.items()})
