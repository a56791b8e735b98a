"""Builders of good and bad scan files for the API tests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def write_array(path: Path, array: np.ndarray, spacing: tuple[float, ...] | None = None) -> Path:
    """Write a numpy array (numpy axis order; 4D as a time series of 3D volumes) as an image file."""
    if array.ndim == 4:
        image = sitk.JoinSeries([sitk.GetImageFromArray(volume) for volume in array])
    else:
        image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def non_image_dicom(path: Path) -> Path:
    """A valid DICOM file without pixel data (a structured-report-like instance)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "Test^NonImage"
    ds.save_as(path, enforce_file_format=True)
    return path


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    """A zip archive with the given member names and contents."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return path


def zip_folder(path: Path, folder: Path, prefix: str | None = None) -> Path:
    """A zip of every file of ``folder`` under ``prefix`` (default: the folder's name)."""
    prefix = folder.name if prefix is None else prefix
    with zipfile.ZipFile(path, "w") as archive:
        for f in sorted(folder.iterdir()):
            archive.write(f, f"{prefix}/{f.name}" if prefix else f.name)
    return path
