"""The one streaming multipart parser, for upload forms (multipart/form-data) and STOW-RS (multipart/related).

Nothing is buffered in memory beyond one network chunk and the small form fields: part contents are written
to files in a staging folder as they arrive. Limits are checked while streaming; every violation is an
:class:`ApiError`: 413 for the body size, the number of parts and the text kept in memory, 400 for a part's
headers above :data:`MAX_HEADER_BYTES` and for malformed or truncated bodies.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import python_multipart
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from service.errors import ApiError

MAX_FIELD_BYTES = 64 * 1024
MAX_MEMORY_BYTES = 1024 * 1024  # all parts kept in memory together
MAX_HEADER_BYTES = 16 * 1024
MAX_PARTS = 10_000
MAX_BOUNDARY = 200  # RFC 2046 says 70, but Orthanc's STOW-RS client sends 73 characters
FILE_FIELD = "files"

log = logging.getLogger(__name__)


@dataclass
class Part:
    """One part of a multipart body: its headers and its content, in ``path`` when spooled else in ``data``."""

    number: int
    headers: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    data: bytes = b""
    size: int = 0
    sha256: str = ""

    def header_options(self, name: str) -> tuple[bytes, dict[bytes, bytes]]:
        """Value and parameters of a header such as Content-Type (lower-case value; empty when absent)."""
        value, options = parse_options_header(self.headers.get(name, ""))
        return value.lower(), options


PartStart = Callable[[Part], bool]
"""Called once a part's headers are read: True spools its content to a file, False keeps it in memory (at most
:data:`MAX_FIELD_BYTES`, all such parts together :data:`MAX_MEMORY_BYTES`). May raise :class:`ApiError` to
refuse the body early."""
PartEnd = Callable[[Part], None]
"""Called with each complete part; may raise :class:`ApiError`."""


class _Collector:
    """python-multipart callbacks that gather each part's headers and stream its content to disk or memory."""

    def __init__(self, staging: Path, start: PartStart, end: PartEnd, max_parts: int, what: str) -> None:
        self.staging = staging
        self.start = start
        self.end = end
        self.max_parts = max_parts
        self.what = what
        self.parts: list[Part] = []
        self.ended = False
        self._part = Part(0)
        self._header_bytes = 0
        self._memory_bytes = 0
        self._name = bytearray()
        self._value = bytearray()
        self._data = bytearray()
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()

    def on_part_begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise ApiError(413, f"too many parts in the {self.what} (at most {self.max_parts})")
        self._part = Part(len(self.parts) + 1)
        self._header_bytes = 0
        self._data = bytearray()

    def _count_header_bytes(self, count: int) -> None:
        self._header_bytes += count
        if self._header_bytes > MAX_HEADER_BYTES:
            raise ApiError(400, f"part {self._part.number} has more than {MAX_HEADER_BYTES} bytes of headers")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._value += data[start:end]

    def on_header_end(self) -> None:
        name = self._name.decode("latin-1").strip().lower()
        self._part.headers[name] = self._value.decode("latin-1").strip()
        self._name.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        if self.start(self._part):
            self._part.path = self.staging / f"part_{self._part.number:05d}"
            self._file = self._part.path.open("wb")
            self._hash = hashlib.sha256()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self._part.size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)
            self._hash.update(chunk)
            return
        if self._part.size > MAX_FIELD_BYTES:
            raise ApiError(413, f"part {self._part.number} is larger than {MAX_FIELD_BYTES} bytes")
        self._memory_bytes += len(chunk)
        if self._memory_bytes > MAX_MEMORY_BYTES:
            raise ApiError(413, f"the {self.what}'s text fields hold more than {MAX_MEMORY_BYTES} bytes")
        self._data += chunk

    def on_part_end(self) -> None:
        part = self._part
        if self._file is not None:
            self._file.close()
            self._file = None
            part.sha256 = self._hash.hexdigest()
        else:
            part.data = bytes(self._data)
        self.parts.append(part)
        self.end(part)

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart content type (400 when missing or too long)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary", b"")
    if not boundary:
        raise ApiError(400, "the multipart content type has no boundary")
    if len(boundary) > MAX_BOUNDARY:
        raise ApiError(400, f"the multipart boundary is longer than {MAX_BOUNDARY} characters")
    return boundary


async def read_parts(
    content_type: str,
    stream: AsyncIterator[bytes],
    staging: Path,
    *,
    max_bytes: int,
    start: PartStart,
    end: PartEnd = lambda part: None,
    max_parts: int = MAX_PARTS,
    what: str = "body",
) -> list[Part]:
    """Parse a multipart body from ``stream``; spooled parts are written to ``staging/part_NNNNN``.

    ``what`` names the body in error messages. Raises :class:`ApiError`: 413 as soon as more than
    ``max_bytes`` arrived or more than ``max_parts`` parts began, 400 for a malformed or truncated body (or
    a client that went away).
    """
    collector = _Collector(staging, start, end, max_parts, what)
    callbacks = {
        name: getattr(collector, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
    }
    parser = python_multipart.MultipartParser(boundary_of(content_type), callbacks)
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                raise ApiError(413, f"{what} larger than the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except python_multipart.exceptions.FormParserError as exc:
        raise ApiError(400, f"malformed multipart body: {str(exc)[:200]}") from None
    except ClientDisconnect:
        log.info("client disconnected before the %s was complete", what)
        raise ApiError(400, "the client disconnected before the body was complete") from None
    finally:
        collector.close()
    if not collector.ended:
        raise ApiError(400, "malformed multipart body: truncated (no closing boundary)")
    return collector.parts


@dataclass
class UploadedFile:
    """One file part of an upload form as written to the staging folder."""

    filename: str
    path: Path
    size: int
    sha256: str


@dataclass
class ParsedForm:
    """Text fields and file parts of a multipart/form-data body."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)


class _FormRules:
    """multipart/form-data: named fields, files only in :data:`FILE_FIELD`, each text field once and UTF-8."""

    def __init__(self) -> None:
        self.form = ParsedForm()

    @staticmethod
    def _disposition(part: Part) -> tuple[str, str | None]:
        _, options = parse_options_header(part.headers.get("content-disposition", ""))
        if b"name" not in options:
            raise ApiError(400, "a form part has no Content-Disposition name")
        filename = options.get(b"filename")
        return options[b"name"].decode("utf-8", "replace"), (
            filename.decode("utf-8", "replace") if filename is not None else None
        )

    def start(self, part: Part) -> bool:
        name, filename = self._disposition(part)
        if filename is not None and name != FILE_FIELD:
            raise ApiError(422, f"files must be sent in the `{FILE_FIELD}` field, not `{name[:64]}`")
        return filename is not None

    def end(self, part: Part) -> None:
        name, filename = self._disposition(part)
        if part.path is not None:
            self.form.files.append(UploadedFile(filename or "", part.path, part.size, part.sha256))
            return
        if name == FILE_FIELD:
            raise ApiError(422, f"the `{FILE_FIELD}` field must carry files (with a filename)")
        if name in self.form.fields:
            raise ApiError(422, f"form field `{name[:64]}` was given more than once")
        try:
            self.form.fields[name] = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, f"form field `{name[:64]}` is not valid UTF-8") from None


async def parse_multipart(
    content_type: str, stream: AsyncIterator[bytes], staging: Path, max_bytes: int
) -> ParsedForm:
    """Parse a multipart/form-data body from ``stream``, writing file parts into ``staging``.

    Raises :class:`ApiError` (413 as soon as more than ``max_bytes`` arrived, 400 for malformed bodies, 422
    for misplaced files or repeated fields).
    """
    rules = _FormRules()
    await read_parts(
        content_type, stream, staging, max_bytes=max_bytes, start=rules.start, end=rules.end, what="upload"
    )
    return rules.form
