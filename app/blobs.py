"""Content-addressed blob store: ``<root>/sha256/ab/<hex>``, deduplicated, written atomically.

Uploads are written to a temporary file under ``<root>/tmp`` (the same file system, so the
final ``os.replace`` is atomic) while their SHA-256 and size are computed. A blob appears
under its name only when complete; readers never see half a file.

A model folder (shards, index, config) is one blob too: a read-only folder named by the hash of
its files' names and hashes (``findlady_core.folders.manifest_sha256``), staged under ``tmp``
and renamed into place whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

from app.errors import ApiError

_HEX64 = re.compile(r"[0-9a-f]{64}")


class TempBlob:
    """A file being received: hashed and counted as it is written, capped at ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.filename: str | None = None  # the name the client gave the part (a shard's name matters)
        self._hash = hashlib.sha256()
        self._file = path.open("xb")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise ApiError(413, "too_large", f"upload exceeds the limit of {self.max_bytes} bytes")
        self._hash.update(data)
        self._file.write(data)

    def finish(self) -> None:
        """Flush to disk; the file is complete and may be parsed."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _HEX64.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def new_temp(self, max_bytes: int) -> TempBlob:
        return TempBlob(self.tmp_dir / f"upload-{secrets.token_hex(12)}", max_bytes)

    def commit(self, tmp: TempBlob) -> tuple[str, bool]:
        """Move a finished upload into place; returns ``(sha256, created)``.

        ``created`` is False when the blob already existed (the upload is dropped): the
        caller removes only blobs it created if its database transaction fails.
        """
        tmp.finish()
        sha = tmp.sha256
        final = self.path(sha)
        if final.exists():
            tmp.discard()
            return sha, False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp.path, 0o444)
        os.replace(tmp.path, final)
        return sha, True

    def add_file(self, path: Path) -> tuple[str, bool]:
        """Move a complete file written under ``tmp_dir`` into place by its hash (as ``commit``)."""
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        sha = h.hexdigest()
        final = self.path(sha)
        if final.exists():
            path.unlink()
            return sha, False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o444)
        os.replace(path, final)
        return sha, True

    def new_staging(self) -> Path:
        """An empty private folder under ``tmp`` to assemble a model folder in."""
        path = self.tmp_dir / f"folder-{secrets.token_hex(12)}"
        path.mkdir(mode=0o700)
        return path

    def commit_folder(self, staging: Path, sha: str) -> tuple[str, bool]:
        """Move a complete staged model folder into place as blob ``sha`` (the caller computed
        it from the files); returns ``(sha, created)`` like ``commit``."""
        final = self.path(sha)
        if final.exists():
            discard_folder(staging)
            return sha, False
        final.parent.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            os.chmod(f, 0o444)
        os.chmod(staging, 0o555)
        os.replace(staging, final)
        return sha, True

    def remove(self, sha256: str) -> None:
        path = self.path(sha256)
        if path.is_dir():
            discard_folder(path)
        else:
            path.unlink(missing_ok=True)

    def count(self) -> int:
        """Number of stored blobs, files and folders (tests check that refused uploads leave none behind)."""
        return sum(1 for p in (self.root / "sha256").glob("*/*") if p.is_file() or p.is_dir())


def discard_folder(path: Path) -> None:
    """Remove a staged or stored model folder (a read-only folder's entries cannot be unlinked)."""
    if path.is_dir():
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)
