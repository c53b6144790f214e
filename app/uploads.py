"""Streaming ``multipart/form-data`` reader.

File fields go straight to ``TempBlob`` files in the blob store's temporary folder (hashed
and counted on the way, never held in memory, with the part's file name); small text fields
are kept as strings. Fields named in ``repeat`` may come several times (the shards of a model
folder) and are collected in ``Form.lists``. The total body size is capped by ``app.middleware.BodyLimit`` as well (413 before the rest of the
body is read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.blobs import BlobStore, TempBlob
from app.errors import ApiError

MAX_TEXT_BYTES = 64 * 1024
MAX_REPEATS = 1000  # parts of one repeated field (the shards of one model)
FLUSH_BYTES = 1 << 20  # hand file data to a worker thread in chunks of about this size


@dataclass
class Form:
    files: dict[str, TempBlob] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[TempBlob]] = field(default_factory=dict)  # the repeated file fields

    def discard(self) -> None:
        for f in self.files.values():
            f.discard()
        for fs in self.lists.values():
            for f in fs:
                f.discard()


@dataclass(eq=False)  # compared by identity: a part's buffers can be large
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    file: TempBlob | None = None
    text: bytearray = field(default_factory=bytearray)
    pending: bytearray = field(default_factory=bytearray)


class _Reader:
    """One request's parse: ``MultipartParser`` calls one method per event. A refusal inside a
    callback is kept in ``error`` and stops the parser (``_Abort``); file data is collected in
    ``to_flush`` and written by a worker thread between chunks (callbacks cannot await)."""

    def __init__(self, *, files: set[str], texts: set[str], store: BlobStore, max_bytes: int,
                 repeat: set[str]) -> None:
        self.files, self.texts, self.store, self.max_bytes = files | repeat, texts, store, max_bytes
        self.repeat = repeat
        self.form = Form()
        self.part = _Part()
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.error: ApiError | None = None
        self.to_flush: list[_Part] = []
        self.ended = False

    def callbacks(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end", "on_end")}

    def fail(self, err: ApiError) -> NoReturn:
        self.error = err
        raise _Abort()

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name.extend(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value.extend(data[start:end])

    def on_header_end(self) -> None:
        self.part.headers.append((bytes(self.header_name).lower(), bytes(self.header_value)))
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        part, form, allowed = self.part, self.form, self.files | self.texts
        disposition = next((v for k, v in part.headers if k == b"content-disposition"), None)
        _, opts = parse_options_header(disposition)
        name = opts.get(b"name")
        if name is None:
            self.fail(ApiError(400, "bad_multipart", "a multipart part has no field name"))
        part.name = name.decode("utf-8", "replace")
        if part.name not in allowed:
            self.fail(ApiError(422, "unknown_field",
                               f"unexpected form field {part.name!r}; expected {', '.join(sorted(allowed))}"))
        if part.name in form.files or part.name in form.texts:
            self.fail(ApiError(422, "duplicate_field", f"form field {part.name!r} was sent twice"))
        if part.name in self.repeat:
            parts = form.lists.setdefault(part.name, [])
            if len(parts) >= MAX_REPEATS:
                self.fail(ApiError(422, "too_many_parts", f"more than {MAX_REPEATS} parts {part.name!r}"))
            part.file = self.store.new_temp(self.max_bytes)
            parts.append(part.file)
        elif part.name in self.files:
            part.file = self.store.new_temp(self.max_bytes)
            form.files[part.name] = part.file
        if part.file is not None:
            filename = opts.get(b"filename")
            part.file.filename = None if filename is None else filename.decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        if part.file is not None:
            part.pending.extend(data[start:end])
            if len(part.pending) >= FLUSH_BYTES and part not in self.to_flush:
                self.to_flush.append(part)
        else:
            part.text.extend(data[start:end])
            if len(part.text) > MAX_TEXT_BYTES:
                self.fail(ApiError(422, "field_too_large", f"form field {part.name!r} exceeds {MAX_TEXT_BYTES} bytes"))

    def on_part_end(self) -> None:
        part = self.part
        if part.file is not None:
            if part not in self.to_flush:
                self.to_flush.append(part)
            return
        try:
            self.form.texts[part.name] = part.text.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(ApiError(422, "bad_field", f"form field {part.name!r} is not UTF-8 text"))

    def on_end(self) -> None:
        self.ended = True

    async def flush(self) -> None:
        for p in self.to_flush:
            assert p.file is not None
            data, p.pending = bytes(p.pending), bytearray()
            await anyio.to_thread.run_sync(p.file.write, data)
        self.to_flush.clear()


async def read_multipart(
    request: Request, *, files: set[str], texts: set[str], store: BlobStore, max_bytes: int,
    repeat: frozenset[str] | set[str] = frozenset(),
) -> Form:
    """Parse the request body; fields outside ``files | texts | repeat``, or repeated ones not
    in ``repeat``, are refused (422)."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart body without a boundary")

    reader = _Reader(files=files, texts=texts, store=store, max_bytes=max_bytes, repeat=set(repeat))
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except _Abort:
                assert reader.error is not None
                raise reader.error from None
            except FormParserError as e:
                raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from None
            await reader.flush()
        try:
            parser.finalize()
        except FormParserError as e:
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from None
        if not reader.ended:
            raise ApiError(400, "bad_multipart", "multipart body ended before its closing boundary")
        await reader.flush()
        for f in [*reader.form.files.values(), *(f for fs in reader.form.lists.values() for f in fs)]:
            await anyio.to_thread.run_sync(f.finish)
    except BaseException:
        reader.form.discard()
        raise
    return reader.form


class _Abort(Exception):
    """Stops the parser from inside a callback; the reason is kept in ``_Reader.error``."""
