"""Content digests of files and DICOM series, shared by bundles (weight checksums) and the service (scan ids)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def series_sha256(file_digests: Iterable[str]) -> str:
    """Digest of a DICOM series from its files' digests, independent of file order or names.

    The sorted hex digests, one per line, hashed again: the same instances give the same value whether they
    were uploaded, pushed over STOW-RS or pulled from a PACS.
    """
    return hashlib.sha256("\n".join(sorted(file_digests)).encode()).hexdigest()
