"""Grouping of uploaded files (streamed to a staging folder by :mod:`service.multipart`) into scans."""

from __future__ import annotations

import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from models.checksums import series_sha256, sha256_file
from service.errors import ApiError
from service.multipart import FILE_FIELD, UploadedFile

MAX_ZIP_ENTRIES = 20_000
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_IMAGE_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha"}


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
    size = target.stat().st_size
    if digest is None:
        digest = sha256_file(target)
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
        digests.append(sha256_file(target))
        size += target.stat().st_size
    return StagedScan(scan_name, "dicom", folder, size, series_sha256(digests), len(files))


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
