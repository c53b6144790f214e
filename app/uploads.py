"""Streaming ``multipart/form-data`` reader.

File fields go straight to ``TempBlob`` files in the blob store's temporary folder (hashed
and counted on the way, never held in memory); small text fields are kept as strings. The
total body size is capped by ``app.middleware.BodyLimit`` as well (413 before the rest of the
body is read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.blobs import BlobStore, TempBlob
from app.errors import ApiError

MAX_TEXT_BYTES = 64 * 1024
FLUSH_BYTES = 1 << 20  # hand file data to a worker thread in chunks of about this size


@dataclass
class Form:
    files: dict[str, TempBlob] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        for f in self.files.values():
            f.discard()


@dataclass(eq=False)  # compared by identity: a part's buffers can be large
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    file: TempBlob | None = None
    text: bytearray = field(default_factory=bytearray)
    pending: bytearray = field(default_factory=bytearray)


async def read_multipart(
    request: Request, *, files: set[str], texts: set[str], store: BlobStore, max_bytes: int
) -> Form:
    """Parse the request body; fields outside ``files | texts`` or repeated are refused (422)."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart body without a boundary")

    form = Form()
    part = _Part()
    header_name = bytearray()
    header_value = bytearray()
    errors: list[ApiError] = []
    to_flush: list[_Part] = []
    ended = False

    def fail(err: ApiError) -> NoReturn:
        errors.append(err)
        raise _Abort()

    def on_part_begin() -> None:
        nonlocal part
        part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        part.headers.append((bytes(header_name).lower(), bytes(header_value)))
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        disposition = next((v for k, v in part.headers if k == b"content-disposition"), None)
        _, opts = parse_options_header(disposition)
        name = opts.get(b"name")
        if name is None:
            fail(ApiError(400, "bad_multipart", "a multipart part has no field name"))
        part.name = name.decode("utf-8", "replace")
        if part.name not in files | texts:
            allowed = ", ".join(sorted(files | texts))
            fail(ApiError(422, "unknown_field", f"unexpected form field {part.name!r}; expected {allowed}"))
        if part.name in form.files or part.name in form.texts:
            fail(ApiError(422, "duplicate_field", f"form field {part.name!r} was sent twice"))
        if part.name in files:
            part.file = store.new_temp(max_bytes)
            form.files[part.name] = part.file

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.file is not None:
            part.pending.extend(data[start:end])
            if len(part.pending) >= FLUSH_BYTES and part not in to_flush:
                to_flush.append(part)
        else:
            part.text.extend(data[start:end])
            if len(part.text) > MAX_TEXT_BYTES:
                fail(ApiError(422, "field_too_large", f"form field {part.name!r} exceeds {MAX_TEXT_BYTES} bytes"))

    def on_part_end() -> None:
        if part.file is not None:
            if part not in to_flush:
                to_flush.append(part)
        else:
            try:
                form.texts[part.name] = part.text.decode("utf-8")
            except UnicodeDecodeError:
                fail(ApiError(422, "bad_field", f"form field {part.name!r} is not UTF-8 text"))

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )

    async def flush(parts: list[_Part]) -> None:
        for p in parts:
            assert p.file is not None
            data, p.pending = bytes(p.pending), bytearray()
            await anyio.to_thread.run_sync(p.file.write, data)
        parts.clear()

    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except _Abort:
                raise errors[0] from None
            except FormParserError as e:
                raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from None
            await flush(to_flush)
        try:
            parser.finalize()
        except FormParserError as e:
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from None
        if not ended:
            raise ApiError(400, "bad_multipart", "multipart body ended before its closing boundary")
        await flush(to_flush)
        for f in form.files.values():
            await anyio.to_thread.run_sync(f.finish)
    except BaseException:
        form.discard()
        raise
    return form


class _Abort(Exception):
    """Stops the parser from inside a callback; the reason is kept aside."""
