"""Validation of one scan with the ML core's reader, shared by the API (at upload) and the workers."""

from __future__ import annotations

import logging
from pathlib import Path

from models.io import InputError, read_image
from service.errors import ApiError, sanitise
from service.uploads import safe_name

log = logging.getLogger(__name__)


def validate_scan(path: Path, max_voxels: int, *, name: str | None = None) -> tuple[list[int], list[float]]:
    """Read a scan (image file or DICOM series folder) once; returns its size and spacing.

    Raises :class:`ApiError` 422 with the reader's reason, prefixed by the scan's name (``name``, default the
    file name without its suffix) and without any server path.
    """
    label = name or safe_name(path.name)
    try:
        image = read_image(path, max_voxels=max_voxels)
    except InputError as exc:
        raise ApiError(422, sanitise(f"scan '{label}': {exc}")) from None
    except Exception as exc:  # ITK and pydicom raise many types for damaged files
        log.warning("unreadable scan %s: %s", label, exc)
        raise ApiError(422, sanitise(f"scan '{label}' could not be read: {exc}")) from None
    return [int(n) for n in image.GetSize()], [round(float(s), 6) for s in image.GetSpacing()]
