"""DICOM SEG export on a real MR series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from service.dicom_seg import read_dicom_seg, write_dicom_seg

SERIES_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/dicom/prostate3t_t2/Prostate3T-03-0001"
LABELS = {1: "prostate", 2: "lesion"}

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")


@pytest.fixture(scope="module")
def image() -> sitk.Image:
    if not SERIES_DIR.is_dir():
        pytest.skip(f"test series missing: {SERIES_DIR}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SERIES_DIR)))
    return reader.Execute()


def write_label(array: np.ndarray, image: sitk.Image, path: Path) -> Path:
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(path))
    return path


@pytest.fixture(scope="module")
def expected(image: sitk.Image) -> np.ndarray:
    """A box (label 1) and a sphere (label 2) on the series grid, (z, y, x)."""
    z, y, x = np.indices(sitk.GetArrayViewFromImage(image).shape)
    array = np.zeros(z.shape, dtype=np.uint8)
    array[5:14, 140:250, 130:260] = 1
    array[(z - 9) ** 2 * 36 + (y - 200) ** 2 + (x - 190) ** 2 <= 20**2] = 2
    return array


@pytest.fixture(scope="module")
def seg_path(image: sitk.Image, expected: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("seg")
    label = write_label(expected, image, tmp / "label.nii.gz")
    return write_dicom_seg(label, SERIES_DIR, LABELS, tmp / "seg.dcm", algorithm_name="ttaseg-test")


def test_seg_decodes_to_the_label_map(seg_path: Path, expected: np.ndarray) -> None:
    assert np.array_equal(read_dicom_seg(seg_path, SERIES_DIR), expected)


def test_seg_references_source_instances_by_position(seg_path: Path) -> None:
    sources = {}
    for f in SERIES_DIR.glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = ds
    source = next(iter(sources.values()))
    seg = pydicom.dcmread(seg_path)
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} <= set(sources)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(
            [float(v) for v in position], [float(v) for v in sources[uid].ImagePositionPatient]
        )


def test_seg_segment_descriptions(seg_path: Path) -> None:
    seg = pydicom.dcmread(seg_path)
    assert seg.SegmentationType == "BINARY"
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert {n: s.SegmentLabel for n, s in segments.items()} == LABELS
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Prostate"
    assert segments[1].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert segments[2].SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
    for segment in segments.values():
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "ttaseg-test"


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy missing (apt-get install -y dicom3tools)"
)
def test_seg_passes_dciodvfy(seg_path: Path) -> None:
    result = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True, timeout=60)
    report = (result.stdout + result.stderr).splitlines()
    assert [line for line in report if line.startswith("Error")] == []


def test_absent_labels_give_empty_segments(image: sitk.Image, expected: np.ndarray, tmp_path: Path) -> None:
    only_box = np.where(expected == 1, 1, 0).astype(np.uint8)
    label = write_label(only_box, image, tmp_path / "box.nii.gz")
    seg = write_dicom_seg(label, SERIES_DIR, {1: "prostate", 2: "lesion", 3: "urethra"}, tmp_path / "box.dcm")
    assert len(pydicom.dcmread(seg).SegmentSequence) == 3
    assert np.array_equal(read_dicom_seg(seg, SERIES_DIR), only_box)

    label = write_label(np.zeros_like(expected), image, tmp_path / "empty.nii.gz")
    seg = write_dicom_seg(label, SERIES_DIR, LABELS, tmp_path / "empty.dcm")
    assert not read_dicom_seg(seg, SERIES_DIR).any()


def test_label_map_off_the_series_grid_is_refused(
    image: sitk.Image, expected: np.ndarray, tmp_path: Path
) -> None:
    label = write_label(expected, image, tmp_path / "label.nii.gz")
    with pytest.raises(ValueError, match="no name"):
        write_dicom_seg(label, SERIES_DIR, {1: "prostate"}, tmp_path / "seg.dcm")
    shifted = sitk.ReadImage(str(label))
    shifted.SetOrigin(shifted.TransformContinuousIndexToPhysicalPoint((0, 0, 0.5)))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(ValueError, match="not on the label map grid"):
        write_dicom_seg(tmp_path / "shifted.nii.gz", SERIES_DIR, LABELS, tmp_path / "seg.dcm")
