"""Streaming multipart parsing straight to a staging folder, and grouping of uploaded files into scans.

Nothing is buffered in memory beyond one network chunk: file parts are written to disk as they arrive, with
their sha256 and the running body size checked against the upload limit.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import python_multipart
from python_multipart.multipart import parse_options_header

from service.errors import ApiError

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 10_000
MAX_ZIP_ENTRIES = 20_000
FILE_FIELD = "files"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_IMAGE_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha"}


@dataclass
class UploadedFile:
    """One file part as written to the staging folder."""

    filename: str
    path: Path
    size: int
    sha256: str


@dataclass
class ParsedForm:
    """Text fields and file parts of a multipart body."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)


@dataclass
class StagedScan:
    """A scan ready for validation: one image file or one DICOM series folder."""

    name: str
    kind: str
    path: Path
    size: int
    sha256: str
    files: int
    shape: list[int] | None = None
    spacing: list[float] | None = None


class _Collector:
    """python-multipart callbacks that stream file parts to disk."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.form = ParsedForm()
        self.ended = False
        self.parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._field_name = ""
        self._field_data = bytearray()
        self._file: BinaryIO | None = None
        self._file_name = ""
        self._file_path: Path | None = None
        self._file_size = 0
        self._file_hash = hashlib.sha256()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(413, f"too many parts in the form (at most {MAX_PARTS})")
        self._disposition = b""
        self._field_data = bytearray()
        self._file = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "a form part has no Content-Disposition name")
        self._field_name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self._field_name != FILE_FIELD:
                raise ApiError(
                    422, f"files must be sent in the `{FILE_FIELD}` field, not `{self._field_name}`"
                )
            self._file_name = options[b"filename"].decode("utf-8", "replace")
            self._file_path = self.staging / f"upload_{len(self.form.files):05d}"
            self._file = self._file_path.open("wb")
            self._file_size = 0
            self._file_hash = hashlib.sha256()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is not None:
            self._file.write(chunk)
            self._file_hash.update(chunk)
            self._file_size += len(chunk)
            return
        if len(self._field_data) + len(chunk) > MAX_FIELD_BYTES:
            raise ApiError(413, f"form field `{self._field_name}` is larger than {MAX_FIELD_BYTES} bytes")
        self._field_data.extend(chunk)

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            assert self._file_path is not None
            self.form.files.append(
                UploadedFile(self._file_name, self._file_path, self._file_size, self._file_hash.hexdigest())
            )
            return
        if self._field_name == FILE_FIELD:
            raise ApiError(422, f"the `{FILE_FIELD}` field must carry files (with a filename)")
        if self._field_name in self.form.fields:
            raise ApiError(422, f"form field `{self._field_name}` was given more than once")
        try:
            self.form.fields[self._field_name] = self._field_data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, f"form field `{self._field_name}` is not valid UTF-8") from None

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


async def parse_multipart(
    content_type: str, stream: AsyncIterator[bytes], staging: Path, max_bytes: int
) -> ParsedForm:
    """Parse a multipart/form-data body from ``stream``, writing file parts into ``staging``.

    Raises :class:`ApiError` (413 as soon as more than ``max_bytes`` arrived, 400 for malformed bodies).
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data without a boundary")
    collector = _Collector(staging)
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
    parser = python_multipart.MultipartParser(boundary, callbacks)
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                raise ApiError(413, f"upload larger than the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except python_multipart.exceptions.FormParserError as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    finally:
        collector.close()
    if not collector.ended:
        raise ApiError(400, "malformed multipart body: truncated (no closing boundary)")
    return collector.form


def safe_name(name: str, fallback: str = "scan") -> str:
    """A filesystem- and URL-safe scan name derived from an uploaded file name."""
    base = PurePosixPath(name.replace("\\", "/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".zip", ".dcm", ".gz"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    cleaned = _SAFE.sub("_", base).strip("._-")[:64]
    return cleaned or fallback


def sniff(path: Path, filename: str) -> str | None:
    """Kind of an uploaded file from its leading bytes: nifti, nrrd, mha, dicom, zip, or None."""
    with path.open("rb") as fh:
        head = fh.read(352)
    lower = filename.lower()
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "nifti" if not lower.endswith((".nrrd", ".mha")) else None
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head.startswith(b"ObjectType") or (lower.endswith(".mha") and b"NDims" in head):
        return "mha"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def _combined_digest(digests: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate = f"{name}_{n}"
        n += 1
    taken.add(candidate)
    return candidate


def _extract_zip(upload: UploadedFile, dest: Path, budget: list[int]) -> list[Path]:
    """Safely extract a zip (no absolute/parent paths, links or encryption; bounded size); returns files."""
    try:
        archive = zipfile.ZipFile(upload.path)
    except (zipfile.BadZipFile, OSError):
        raise ApiError(422, f"file '{upload.filename}' is not a readable zip archive") from None
    extracted: list[Path] = []
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise ApiError(413, f"zip '{upload.filename}' has more than {MAX_ZIP_ENTRIES} entries")
        for info in infos:
            raw = info.filename.replace("\\", "/")
            parts = PurePosixPath(raw).parts
            if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or ".." in parts:
                raise ApiError(422, f"zip '{upload.filename}' has an unsafe path: {info.filename!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ApiError(422, f"zip '{upload.filename}' contains a symbolic link: {info.filename!r}")
            if info.flag_bits & 0x1:
                raise ApiError(422, f"zip '{upload.filename}' is encrypted")
            if info.is_dir() or parts[0] == "__MACOSX" or parts[-1].startswith("."):
                continue
            if info.file_size > budget[0]:
                raise ApiError(413, f"zip '{upload.filename}' unpacks to more than the allowed size")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as src, target.open("wb") as out:
                    while chunk := src.read(1024 * 1024):
                        budget[0] -= len(chunk)
                        if budget[0] < 0:
                            raise ApiError(
                                413, f"zip '{upload.filename}' unpacks to more than the allowed size"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
                raise ApiError(422, f"zip '{upload.filename}' is corrupt: {exc}") from None
            extracted.append(target)
    return extracted


def _image_scan(
    name: str,
    kind: str,
    src: Path,
    staging: Path,
    taken: set[str],
    digest: str | None = None,
) -> StagedScan:
    """Move an image file into its own scan file with the suffix SimpleITK needs (one-file images only)."""
    suffix = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}[kind]
    with src.open("rb") as fh:
        if kind == "nifti" and fh.read(2) != b"\x1f\x8b":
            suffix = ".nii"
    scan_name = _unique(name, taken)
    target = staging / "scans" / f"{scan_name}{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, target)
    if digest is None:
        size, digest = _file_digest(target)
    else:
        size = target.stat().st_size
    return StagedScan(scan_name, kind, target, size, digest, 1)


def _dicom_scan(name: str, files: list[Path], staging: Path, taken: set[str]) -> StagedScan:
    """Gather DICOM files into one series folder."""
    scan_name = _unique(name, taken)
    folder = staging / "scans" / scan_name
    folder.mkdir(parents=True)
    digests, size = [], 0
    for n, src in enumerate(files):
        target = folder / f"{n:05d}.dcm"
        shutil.move(src, target)
        file_size, digest = _file_digest(target)
        digests.append(digest)
        size += file_size
    return StagedScan(scan_name, "dicom", folder, size, _combined_digest(digests), len(files))


def _zip_scans(upload: UploadedFile, staging: Path, budget: list[int], taken: set[str]) -> list[StagedScan]:
    """Scans in a zip: each image file is one scan, DICOM files are grouped by folder."""
    dest = staging / f"unzip_{upload.path.name}"
    files = _extract_zip(upload, dest, budget)
    scans: list[StagedScan] = []
    dicom_dirs: dict[Path, list[Path]] = {}
    stem = safe_name(upload.filename, "archive")
    for path in sorted(files):
        if path.name.upper() == "DICOMDIR":
            continue
        kind = sniff(path, path.name)
        if kind in ("nifti", "nrrd", "mha"):
            scans.append(_image_scan(safe_name(path.name), kind, path, staging, taken))
        elif kind == "dicom":
            dicom_dirs.setdefault(path.parent, []).append(path)
    for folder, members in sorted(dicom_dirs.items()):
        rel = folder.relative_to(dest)
        name = stem if len(dicom_dirs) == 1 or rel == Path(".") else f"{stem}_{safe_name(str(rel))}"
        scans.append(_dicom_scan(name, members, staging, taken))
    if not scans:
        raise ApiError(422, f"zip '{upload.filename}' contains no NIfTI, NRRD, MHA or DICOM image files")
    return scans


def assemble_scans(uploads: list[UploadedFile], staging: Path, max_unzipped_bytes: int) -> list[StagedScan]:
    """Group uploads into scans: one per image file, one per zip folder of DICOM, one for loose DICOM."""
    if not uploads:
        raise ApiError(422, f"no files uploaded: send one or more scans in the `{FILE_FIELD}` field")
    scans: list[StagedScan] = []
    loose_dicom: list[Path] = []
    taken: set[str] = set()
    budget = [max_unzipped_bytes]
    for upload in uploads:
        if upload.size == 0:
            raise ApiError(422, f"file '{upload.filename}' is empty")
        kind = sniff(upload.path, upload.filename)
        if kind is None:
            raise ApiError(
                415, f"file '{upload.filename}' is not a NIfTI, NRRD, MHA or DICOM file, nor a zip of them"
            )
        if kind == "zip":
            scans.extend(_zip_scans(upload, staging, budget, taken))
        elif kind == "dicom":
            loose_dicom.append(upload.path)
        else:
            scans.append(
                _image_scan(
                    safe_name(upload.filename),
                    kind,
                    upload.path,
                    staging,
                    taken,
                    upload.sha256,
                )
            )
    if loose_dicom:
        scans.append(_dicom_scan("dicom", loose_dicom, staging, taken))
    return scans
