"""Image input/output with SimpleITK: NIfTI, NRRD, MHA and DICOM series, with validation of what comes in."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MAX_VOXELS = 512 * 512 * 512
MAX_SIDE = 2048
MIN_SIDE = 2
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class InputError(ValueError):
    """A scan that cannot be segmented; the message says why, in words a user can act on."""


def case_name(path: str | Path) -> str:
    """Case name of an input: the file name without its image extension, or the DICOM folder's name."""
    p = Path(path)
    if p.is_dir():
        return p.name
    name = p.name
    for suffix in IMAGE_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def _dicom_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            files.append(p)
    return files


def _read_dicom_series(paths: Sequence[Path], series_uid: str | None) -> sitk.Image:
    """Assemble one DICOM series; slices are sorted along the slice normal by ImagePositionPatient (GDCM)."""
    files = _dicom_files(paths)
    if not files:
        raise InputError("no files found for the DICOM series")
    by_series: dict[str, list[str]] = {}
    reader = sitk.ImageFileReader()
    for f in files:
        reader.SetFileName(str(f))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        keys = set(reader.GetMetaDataKeys())
        if "0020|000e" not in keys:
            continue
        if "0028|0010" not in keys:  # no Rows: not an image instance (SR, SEG without pixels, ...)
            continue
        by_series.setdefault(reader.GetMetaData("0020|000e").strip(), []).append(str(f))
    if not by_series:
        raise InputError("no DICOM image instances found (files are not DICOM or carry no pixel data)")
    if series_uid is None:
        if len(by_series) > 1:
            listing = ", ".join(f"{uid} ({len(v)} files)" for uid, v in sorted(by_series.items()))
            raise InputError(f"several DICOM series found; choose one by SeriesInstanceUID: {listing}")
        series_uid = next(iter(by_series))
    if series_uid not in by_series:
        raise InputError(f"series {series_uid} not found among {sorted(by_series)}")
    folder = str(Path(by_series[series_uid][0]).parent)
    ordered = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid)
    ordered = [f for f in ordered if f in set(by_series[series_uid])] or by_series[series_uid]
    if len(ordered) < MIN_SIDE:
        raise InputError(f"DICOM series {series_uid} has {len(ordered)} slice(s): a 3D volume needs several")
    series_reader = sitk.ImageSeriesReader()
    series_reader.SetFileNames(ordered)
    series_reader.MetaDataDictionaryArrayUpdateOn()
    try:
        return series_reader.Execute()  # applies RescaleSlope/Intercept
    except RuntimeError as exc:
        raise InputError(f"cannot assemble DICOM series {series_uid}: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    msg = next((t for t in text if "Exception" not in t and t.strip()), text[-1] if text else "")
    return re.sub(r"\s+", " ", msg)[:300]


def read_image(
    source: str | Path | Sequence[str | Path],
    series_uid: str | None = None,
    frame: int | None = None,
    *,
    max_voxels: int | None = None,
) -> sitk.Image:
    """Read and validate a 3D scan: an image file, a DICOM folder, or a list of DICOM files.

    A 4D image is accepted only when ``frame`` picks one of its volumes; ``max_voxels`` (when given) refuses a
    larger scan with an InputError.
    """
    paths = [Path(source)] if isinstance(source, str | Path) else [Path(s) for s in source]
    for p in paths:
        if not p.exists():
            raise InputError(f"{p.name}: file not found")
    single = paths[0] if len(paths) == 1 else None
    is_image_file = single is not None and single.is_file() and single.name.lower().endswith(IMAGE_SUFFIXES)
    if is_image_file:
        try:
            image = sitk.ReadImage(str(single))
        except RuntimeError as exc:
            raise InputError(
                f"{single.name}: not a readable image (corrupt or truncated): {_first_line(exc)}"
            ) from exc
    else:
        image = _read_dicom_series(paths, series_uid)
    if image.GetDimension() == 4:
        if frame is None:
            raise InputError(
                f"4D image of size {image.GetSize()}: choose a frame (0..{image.GetSize()[3] - 1})"
            )
        if not 0 <= frame < image.GetSize()[3]:
            raise InputError(f"frame {frame} out of range 0..{image.GetSize()[3] - 1}")
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, frame])
    if max_voxels is not None and image.GetNumberOfPixels() > max_voxels:
        raise InputError(f"{image.GetNumberOfPixels()} voxels; the limit is {max_voxels}")
    validate_image(image)
    if is_image_file and single.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(single)
    return image


def _check_nifti_data(path: Path) -> None:
    """Read the stored voxels once more with nibabel: ITK accepts truncated gzip streams and turns NaN into 0."""
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise InputError(f"{path.name}: not a readable image (corrupt or truncated): {exc}") from exc
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise InputError("image contains NaN or infinite values")


def validate_image(image: sitk.Image) -> None:
    """Raise InputError unless ``image`` is a finite, non-constant, sanely sized scalar 3D volume."""
    dim = image.GetDimension()
    if dim != 3:
        raise InputError(f"expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("expected a scalar (grey-level) image, got a multi-component (e.g. RGB) image")
    size = image.GetSize()
    if min(size) < MIN_SIDE:
        raise InputError(f"image of size {size} is not a 3D volume (a side has fewer than {MIN_SIDE} voxels)")
    if max(size) > MAX_SIDE or int(np.prod(size)) > MAX_VOXELS:
        raise InputError(f"image of size {size} is too large (max {MAX_SIDE} per side, {MAX_VOXELS} voxels)")
    spacing = image.GetSpacing()
    if not all(np.isfinite(s) and 0.01 <= s <= 100.0 for s in spacing):
        raise InputError(f"implausible voxel spacing {spacing} mm")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("image contains NaN or infinite values")
    if array.min() == array.max():
        raise InputError("image is constant: nothing to segment")


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image (compressed when the format allows) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """True when two images share size, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )
