"""DICOM Segmentation (SEG) export of label maps, and decoding back to label arrays.

The SEG is written with highdicom as segmentation type BINARY: one segment per label, one 1-bit frame per
(segment, source slice) that contains the segment. BINARY is read by every SEG consumer in the field
(OHIF, 3D Slicer/dcmqi, Orthanc viewers, commercial PACS), whereas LABELMAP (DICOM 2024) is still too new
for most of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
MANUFACTURER = "ttaseg"
DEVICE_SERIAL_NUMBER = "1"
GRID_TOLERANCE_VOXELS = 0.05  # how far (in voxels) a source slice may lie from the label grid
DIRECTION_TOLERANCE = 1e-3


def load_series(source_dicom_dir: Path) -> list[pydicom.Dataset]:
    """Headers of the single image series under ``source_dicom_dir``, sorted along the slice normal.

    This is the slice order of SimpleITK's ImageSeriesReader (GDCM sorts by ImagePositionPatient).
    Files that are not DICOM, carry no image plane (SR, SEG, ...) or are multi-frame are ignored.
    """
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(p for p in Path(source_dicom_dir).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if ds.get("SOPClassUID") == SEG_SOP_CLASS_UID or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "Rows" not in ds:
            continue
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if not by_series:
        raise ValueError(f"no single-frame DICOM image series found in {source_dicom_dir}")
    if len(by_series) > 1:
        raise ValueError(f"several DICOM series in {source_dicom_dir}: {sorted(by_series)}")
    datasets = next(iter(by_series.values()))
    normal = _slice_normal(datasets[0])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def _slice_normal(ds: pydicom.Dataset) -> np.ndarray:
    orientation = np.asarray(ds.ImageOrientationPatient, float)
    return np.cross(orientation[:3], orientation[3:])


def segment_codes(name: str) -> tuple[pydicom.sr.coding.Code, pydicom.sr.coding.Code]:
    """(category, type) codes for a label name, looked up in the DICOM segmentation context groups.

    Anatomy (CID 7192), lesions (CID 7159) and tissues (CID 7166) get their SNOMED CT concept; other names
    get the generic Tissue/Tissue pair (the segment label still carries the name).
    """
    key = "".join(word.capitalize() for word in re.split(r"[^A-Za-z0-9]+", name) if word)
    for group, category in (
        (codes.cid7192, codes.cid7150.AnatomicalStructure),
        (codes.cid7159, codes.cid7150.MorphologicallyAbnormalStructure),
        (codes.cid7166, codes.cid7150.Tissue),
    ):
        if key in group.dir():
            return category, getattr(group, key)
    return codes.cid7150.Tissue, codes.SCT.Tissue


def _check_grid(label: sitk.Image, ref: pydicom.Dataset) -> None:
    size = label.GetSize()
    if label.GetDimension() != 3 or (size[0], size[1]) != (int(ref.Columns), int(ref.Rows)):
        raise ValueError(
            f"label map of size {size} does not match the {ref.Columns}x{ref.Rows} source slices"
        )
    direction = np.asarray(label.GetDirection()).reshape(3, 3)
    orientation = np.asarray(ref.ImageOrientationPatient, float)
    if not np.allclose(direction[:, :2].T.ravel(), orientation, atol=DIRECTION_TOLERANCE):
        raise ValueError("label map orientation differs from the source series (ImageOrientationPatient)")
    row_spacing, column_spacing = (float(v) for v in ref.PixelSpacing)
    if not np.allclose(label.GetSpacing()[:2], (column_spacing, row_spacing), rtol=1e-3):
        raise ValueError(
            f"label map spacing {label.GetSpacing()[:2]} differs from PixelSpacing of the source"
        )


def _frame_sources(label: sitk.Image, datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Source dataset of each label slice k, found by ImagePositionPatient (not by file order)."""
    by_slice: dict[int, pydicom.Dataset] = {}
    for ds in datasets:
        position = [float(v) for v in ds.ImagePositionPatient]
        index = label.TransformPhysicalPointToContinuousIndex(position)
        k = round(index[2])
        off_grid = max(abs(index[0]), abs(index[1]), abs(index[2] - k)) > GRID_TOLERANCE_VOXELS
        if off_grid or not 0 <= k < label.GetSize()[2]:
            raise ValueError(f"source slice {ds.SOPInstanceUID} at {position} is not on the label map grid")
        if k in by_slice:
            raise ValueError(f"two source slices fall on label slice {k}")
        by_slice[k] = ds
    if len(by_slice) != label.GetSize()[2]:
        missing = sorted(set(range(label.GetSize()[2])) - set(by_slice))
        raise ValueError(f"label slices {missing} have no source slice")
    return [by_slice[k] for k in range(label.GetSize()[2])]


def write_dicom_seg(
    label_path: Path,
    source_dicom_dir: Path,
    labels: dict[int, str],
    out_path: Path,
    algorithm_name: str = "ttaseg",
    algorithm_version: str = "0.1",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Path:
    """Write the label map ``label_path`` (on the grid of the series in ``source_dicom_dir``) as a DICOM SEG.

    ``labels`` maps label values to names (0, background, is ignored). Segments are numbered 1..N in
    ascending label value, so contiguous labels 1..N keep their values. Labels absent from the map give
    segments without frames; values in the map that ``labels`` does not name raise ValueError. The series
    and SOP Instance UIDs are new unless given (fixed UIDs make a re-push replace the earlier copy).
    """
    label = sitk.ReadImage(str(label_path))
    datasets = load_series(Path(source_dicom_dir))
    _check_grid(label, datasets[0])
    sources = _frame_sources(label, datasets)

    array = sitk.GetArrayViewFromImage(label)  # (z, y, x)
    present = np.unique(array)
    if present[0] < 0 or not np.array_equal(present, np.round(present)):
        raise ValueError("label map must hold non-negative integer labels")
    values = sorted(v for v in labels if v != 0)
    if not values:
        raise ValueError("labels names no segment (only background)")
    unknown = sorted(set(present.astype(np.int64).tolist()) - set(values) - {0})
    if unknown:
        raise ValueError(f"label map holds values {unknown} that have no name in labels")
    lut = np.zeros(max(values) + 1, dtype=np.uint16)
    lut[values] = np.arange(1, len(values) + 1)
    segment_numbers = lut[array.astype(np.int64) if array.dtype.kind == "f" else array]

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        category, property_type = segment_codes(labels[value])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=labels[value][:64],
                segmented_property_category=category,
                segmented_property_type=property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    source_series_number = int(datasets[0].get("SeriesNumber") or 0)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segment_numbers,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=1000 + source_series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label="SEGMENTATION",
        content_description=f"{algorithm_name} {algorithm_version} automatic segmentation"[:64],
    )
    seg.SeriesDescription = f"{algorithm_name} segmentation"[:64]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path, enforce_file_format=True)
    return out_path


def read_dicom_seg(path: Path, reference_dicom_dir: Path) -> np.ndarray:
    """Decode a SEG into a label array (z, y, x) on the grid of the series in ``reference_dicom_dir``.

    Voxel values are segment numbers (0 where no segment); frames are placed by their source instance.
    """
    seg = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in load_series(Path(reference_dicom_dir))]
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        combine_segments=True,
        assert_missing_frames_are_empty=True,
        dtype=np.uint16,
    )
