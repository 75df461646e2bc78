"""A file uploaded to the console, kept on the box: the restore's backup, an update's bundle. Read as it
arrives, the form's fields before the file deciding whether any of it is written (read_upload)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request

from web.security import CSRF_FIELD, FORM_EXPIRED, csrf_ok, refuse_other_sites


class _Form:
    """python-multipart's callbacks for a form of text fields and at most one file: the fields kept, the
    file's data handed out a chunk at a time (`pending`), never kept here."""

    def __init__(self, max_fields: int, max_part: int) -> None:
        self.max_fields, self.max_part = max_fields, max_part
        self.fields: dict[str, str] = {}
        self.header_name, self.header_value, self.disposition = b"", b"", b""
        self.name = ""
        self.data = bytearray()
        self.filename: str | None = None  # of the part being read, when it is a file
        self.files = 0
        # The name of the file whose headers were read, while what becomes of its data is to be decided: the
        # part may have ended, and others begun, in the same chunk (a small file before the form's last fields).
        self.file_began: str | None = None
        self.pending: list[bytes] = []

    def on_part_begin(self) -> None:
        self.disposition, self.filename = b"", None
        self.data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        if len(self.header_value) > self.max_part:
            raise ValueError("a part's header is too long")

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise ValueError("a part without a name")
        self.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            self.files += 1
            if self.files > 1:
                raise ValueError("more than one file")
            self.filename = options[b"filename"].decode("utf-8", "replace")
            self.file_began = self.filename
        elif len(self.fields) >= self.max_fields:
            raise ValueError("too many fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.filename is not None:
            self.pending.append(data[start:end])
            return
        self.data += data[start:end]
        if len(self.data) > self.max_part:
            raise ValueError("a field is too long")

    def on_part_end(self) -> None:
        if self.filename is None:
            self.fields[self.name] = self.data.decode("utf-8", "replace")


class _Written:
    """The file an upload goes into: made new, the box user's alone (as save_private makes it)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.fd = -1

    def open(self, path: Path | None) -> None:
        if path is not None:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self.path = path

    async def take(self, pending: list[bytes]) -> None:
        if pending and self.fd >= 0:
            await asyncio.to_thread(_write_all, self.fd, b"".join(pending))
        pending.clear()

    def close(self, *, keep: bool) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not keep and self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _parsed(step: Callable[..., object], *args: bytes) -> None:
    try:
        step(*args)
    except ValueError as exc:  # python-multipart's parse errors are ValueErrors too
        raise HTTPException(400, "The form could not be read.") from exc


async def read_form_and_file(request: Request, place: Callable[[dict[str, str]], Awaitable[Path | None]], *,
                             max_fields: int = 10, max_part: int = 64 * 1024) -> tuple[dict[str, str], Path | None]:
    """A multipart form of text fields and at most one file, read as it arrives; the file goes straight
    into a new file of the box's user alone. When the file's part begins, `place(the fields before it)`
    says where it goes, or None: then the rest is read and none of it kept. So the fields
    that come first in the form (its CSRF token, the wizard's setup code) decide whether a byte of the
    file is written anywhere; starlette's form reading wrote all of it to a spool file before any field
    could be looked at. `place` may raise HTTPException to answer at once. Returns the fields and the
    file written (None without one, or when refused); HTTPException(400) for a malformed form."""
    import python_multipart.multipart as multipart

    kind, params = multipart.parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data":  # a form without a file input (urlencoded): starlette reads it
        try:
            plain = await request.form(max_files=0, max_fields=max_fields, max_part_size=max_part)
        except Exception as exc:  # malformed, too many fields: the client's fault
            raise HTTPException(400, "The form could not be read.") from exc
        return {key: value for key, value in plain.multi_items() if isinstance(value, str)}, None
    if b"boundary" not in params:
        raise HTTPException(400, "The form could not be read.")
    form = _Form(max_fields, max_part)
    parser = multipart.MultipartParser(params[b"boundary"], {
        "on_part_begin": form.on_part_begin, "on_part_data": form.on_part_data, "on_part_end": form.on_part_end,
        "on_header_field": form.on_header_field, "on_header_value": form.on_header_value,
        "on_header_end": form.on_header_end, "on_headers_finished": form.on_headers_finished,
    })
    written = _Written()
    kept = False
    try:
        async for chunk in request.stream():
            _parsed(parser.write, chunk)
            if form.file_began is not None:
                began, form.file_began = form.file_began, None
                written.open(await place(dict(form.fields)) if began else None)
            await written.take(form.pending)
        _parsed(parser.finalize)
        kept = True
    finally:
        written.close(keep=kept)
    return form.fields, written.path


def declared_length(request: Request) -> int:
    """The size an upload declares, before any of it is read, so its room can be reserved. A body in
    chunks is refused (411): its length is the chunks' (RFC 9112 6.3), whatever Content-Length says, so
    a reservation of 100 octets would let a stranger write 200 MiB. Browsers send Content-Length alone."""
    if "transfer-encoding" in request.headers:
        raise HTTPException(411, "The upload must say its size (Content-Length), not come in chunks.")
    try:
        return int(request.headers.get("content-length", ""))
    except ValueError:
        raise HTTPException(411, "The upload must say its size (Content-Length).") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def read_upload(request: Request, place: Callable[[dict[str, str]], Awaitable[Path | None]], *,
                      max_fields: int = 10) -> tuple[dict[str, str], Path | None]:
    """read_form_and_file with this session's CSRF token required: among the fields before the file
    (`place` is asked only then, and nothing of the file is written without it), and in a form sent
    without a file; and a form from this site's own page. HTTPException(403) otherwise."""
    refuse_other_sites(request)

    async def checked(fields: dict[str, str]) -> Path | None:
        if not csrf_ok(request.session, fields.get(CSRF_FIELD)):
            raise HTTPException(403, FORM_EXPIRED)
        return await place(fields)

    fields, path = await read_form_and_file(request, checked, max_fields=max_fields)
    if not csrf_ok(request.session, fields.get(CSRF_FIELD)):
        if path is not None:
            await asyncio.to_thread(path.unlink, True)
        raise HTTPException(403, FORM_EXPIRED)
    return fields, path
