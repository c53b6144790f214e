"""Unpack an uploaded ``.zip`` or ``.tar`` of a model folder, safely, into a staging folder.

Archives come from strangers, so before anything is written every member is checked: a plain
file or a folder entry (no symbolic or hard links, devices, FIFOs), a relative name without
``..`` or a drive, at most one top-level folder above the files and no deeper folders, at most
``MAX_MEMBERS`` members, no name twice, no encrypted zip member. Only model files are written
(``config.json``, ``*.safetensors``, ``*.bin``, ``*.index.json``: a tokenizer or a README is
skipped), streamed to disk in chunks and counted as they go, so a bomb (a member that unpacks
far beyond its size) stops at ``max_bytes`` whatever its header claims. Any refusal names the
member; the caller removes the staging folder.
"""

from __future__ import annotations

import hashlib
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from findlady_core.errors import InputError

MAX_MEMBERS = 256
CHUNK = 1 << 20
_MODEL_FILE = re.compile(r"config\.json|[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.(safetensors|bin|index\.json)")


class ArchiveError(InputError):
    code = "bad_archive"


@dataclass(frozen=True)
class _Member:
    name: str  # as stored in the archive (for messages)
    parts: tuple[str, ...]  # the checked path components
    size: int  # as the header claims (checked again while streaming)
    is_dir: bool
    handle: object  # ZipInfo or TarInfo


def kind(path: Path) -> str | None:
    """``"zip"``, ``"tar"`` or None, from the file's bytes (never its name)."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def _parts(name: str) -> tuple[str, ...]:
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\0" in name or re.match(r"[A-Za-z]:", name):
        raise ArchiveError(f"archive member {name[:200]!r} has an absolute or unusual path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive member {name[:200]!r} points outside the folder ('..')")
    if not parts:
        raise ArchiveError(f"archive member {name[:200]!r} has an empty name")
    return parts


def _zip_members(z: zipfile.ZipFile) -> list[_Member]:
    out = []
    for info in z.infolist():
        ftype = stat.S_IFMT(info.external_attr >> 16)  # Unix file type, 0 when the zip does not say
        if info.flag_bits & 0x1:
            raise ArchiveError(f"archive member {info.filename[:200]!r} is encrypted")
        if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"archive member {info.filename[:200]!r} is a link or special file, not a plain file")
        out.append(_Member(info.filename, _parts(info.filename), info.file_size, info.is_dir(), info))
    return out


def _tar_members(t: tarfile.TarFile) -> list[_Member]:
    out = []
    for i, info in enumerate(t):  # header by header: stops at the limit without reading the rest
        if i >= MAX_MEMBERS:
            raise ArchiveError(f"the archive has more than {MAX_MEMBERS} members")
        if not (info.isfile() or info.isdir()):
            what = "a link" if info.issym() or info.islnk() else "a device or FIFO"
            raise ArchiveError(f"archive member {info.name[:200]!r} is {what}, not a plain file")
        out.append(_Member(info.name, _parts(info.name), info.size, info.isdir(), info))
    return out


@contextmanager
def _open(path: Path) -> Iterator[tuple[list[_Member], object]]:
    k = kind(path)
    try:
        if k == "zip":
            with zipfile.ZipFile(path) as z:
                if len(z.infolist()) > MAX_MEMBERS:
                    raise ArchiveError(f"the archive has {len(z.infolist())} members, more than {MAX_MEMBERS}")
                yield _zip_members(z), z
        elif k == "tar":
            with tarfile.open(path, mode="r:") as t:
                yield _tar_members(t), t
        else:
            raise ArchiveError("the archive is neither a zip nor a tar file")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"the archive is corrupt: {str(e)[:200]}") from None


def _reader(archive: object, m: _Member) -> IO[bytes]:
    if isinstance(archive, zipfile.ZipFile):
        return archive.open(m.handle)  # type: ignore[arg-type]
    f = archive.extractfile(m.handle)  # type: ignore[attr-defined]
    assert f is not None  # a regular file (checked)
    return f  # type: ignore[no-any-return]


def unpack(path: Path, dest: Path, *, max_bytes: int) -> dict[str, str]:
    """Write the archive's model files into the empty folder ``dest``; return name -> sha256.

    ``max_bytes`` bounds each member and all of them together, as actually unpacked."""
    with _open(path) as (members, archive):
        files = [m for m in members if not m.is_dir]
        tops = {m.parts[0] for m in files if len(m.parts) == 2}
        for m in files:
            if len(m.parts) > 2 or (len(m.parts) == 2 and len(tops) > 1) or (len(m.parts) == 1 and tops):
                raise ArchiveError(
                    f"archive member {m.name[:200]!r}: the files must sit at the top or under one top-level folder"
                )
        seen: set[str] = set()
        for m in files:
            if m.parts[-1] in seen:
                raise ArchiveError(f"archive member {m.name[:200]!r} is in the archive twice")
            seen.add(m.parts[-1])
        wanted = [m for m in files if _MODEL_FILE.fullmatch(m.parts[-1])]
        if not wanted:
            raise ArchiveError("the archive holds no model files (config.json, *.safetensors, *.bin, *.index.json)")
        hashes: dict[str, str] = {}
        total = 0
        for m in wanted:
            if m.size > max_bytes:
                raise ArchiveError(f"archive member {m.name[:200]!r} claims {m.size} bytes, more than the limit of {max_bytes}")
            h = hashlib.sha256()
            try:
                with _reader(archive, m) as src, (dest / m.parts[-1]).open("xb") as out:
                    while chunk := src.read(CHUNK):
                        total += len(chunk)
                        if total > max_bytes:
                            raise ArchiveError(
                                f"archive member {m.name[:200]!r}: the archive unpacks to more than the limit of "
                                f"{max_bytes} bytes"
                            )
                        h.update(chunk)
                        out.write(chunk)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, NotImplementedError) as e:
                raise ArchiveError(f"archive member {m.name[:200]!r} is corrupt: {str(e)[:200]}") from None
            hashes[m.parts[-1]] = h.hexdigest()
        return hashes
