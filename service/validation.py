"""Validation of one scan with the ML core's checks, shared by the API (at upload) and the workers."""

from __future__ import annotations

import logging
from pathlib import Path

from models.io import InputError, check_image
from service.errors import ApiError, sanitise
from service.uploads import safe_name

log = logging.getLogger(__name__)


def validate_scan(path: Path, max_voxels: int, *, name: str | None = None) -> tuple[list[int], list[float]]:
    """Check a scan (image file or DICOM series folder) without holding its pixels; returns size and spacing.

    ``models.io.check_image`` refuses data referenced outside the file and enforces the limits from the header
    before any pixel is read, so memory stays bounded whatever the file claims.

    Raises :class:`ApiError` 422 with the reader's reason, prefixed by the scan's name (``name``, default the
    file name without its suffix) and without any server path.
    """
    label = name or safe_name(path.name)
    try:
        header = check_image(path, max_voxels=max_voxels)
    except InputError as exc:
        raise ApiError(422, sanitise(f"scan '{label}': {exc}")) from None
    except Exception as exc:  # ITK and pydicom raise many types for damaged files
        log.warning("unreadable scan %s: %s", label, exc)
        raise ApiError(422, f"scan '{label}' could not be read") from None
    return [int(n) for n in header.size], [round(float(s), 6) for s in header.spacing]
