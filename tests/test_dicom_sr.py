"""Measurement report (TID 1500, Comprehensive 3D SR) of a scan's results on a real MR series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from service.dicom_seg import write_dicom_seg
from service.dicom_sr import FALLBACK, read_volumes, write_measurement_report
from service.dicomweb import image_series

SERIES_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/dicom/prostate3t_t2/Prostate3T-03-0001"
VOLUMES = {"prostate": 41.25, "lesion": 0.375}
QUALITY = {"mean_entropy": 0.12, "agreement_with_source": 0.93}
REASON = "volume of lesion changed by 310% (more than 50%)"

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not SERIES_DIR.is_dir():
        pytest.skip(f"test series missing: {SERIES_DIR}")
    tmp = tmp_path_factory.mktemp("sr")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SERIES_DIR)))
    image = reader.Execute()
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    array[5:14, 140:250, 130:260] = 1
    array[8:10, 190:210, 180:200] = 2
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(tmp / "label.nii.gz"))
    seg = write_dicom_seg(tmp / "label.nii.gz", SERIES_DIR, {1: "prostate", 2: "lesion"}, tmp / "seg.dcm")
    sr = write_measurement_report(
        seg,
        SERIES_DIR,
        VOLUMES,
        QUALITY,
        True,
        REASON,
        tmp / "sr.dcm",
        series_instance_uid="1.2.826.0.1.3680043.8.498.1",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
    )
    return seg, sr


def test_report_holds_volumes_per_segment(report: tuple[Path, Path]) -> None:
    seg_path, sr_path = report
    assert read_volumes(sr_path) == VOLUMES
    sr = hd.sr.srread(sr_path)
    seg = hd.seg.segread(seg_path)
    assert sr.Modality == "SR" and sr.SOPInstanceUID == "1.2.826.0.1.3680043.8.498.2"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == ["99TTASEG"]
    groups = sr.content.get_volumetric_roi_measurement_groups()
    referenced = {str(g.tracking_identifier): g.referenced_segment.referenced_segment_numbers for g in groups}
    assert referenced == {"prostate": [1], "lesion": [2]}
    assert {g.referenced_segment.referenced_sop_instance_uid for g in groups} == {seg.SOPInstanceUID}


def test_report_holds_quality_and_guard_decision(report: tuple[Path, Path]) -> None:
    [run] = hd.sr.srread(report[1]).content.get_image_measurement_groups()
    assert {m.name.meaning: m.value for m in run.get_measurements()} == pytest.approx(
        {"mean entropy": 0.12, "agreement with source": 0.93}
    )
    [decision] = run.get_qualitative_evaluations(name=FALLBACK)
    assert decision.value.meaning == "Yes"
    assert REASON in [str(item.TextValue) for item in run[0].ContentSequence if "TextValue" in item]


def test_unknown_structure_is_refused(report: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no segment"):
        write_measurement_report(
            report[0],
            SERIES_DIR,
            {"liver": 1.0},
            {},
            False,
            None,
            tmp_path / "sr.dcm",
            series_instance_uid="1.2.3",
            sop_instance_uid="1.2.4",
        )


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_report_is_valid_dicom(report: tuple[Path, Path]) -> None:
    run = subprocess.run(["dciodvfy", str(report[1])], capture_output=True, text=True, timeout=120)
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []


def test_result_series_are_not_taken_as_input(report: tuple[Path, Path], tmp_path: Path) -> None:
    folders = []
    for path in report:
        folders.append(tmp_path / path.stem)
        folders[-1].mkdir()
        shutil.copy(path, folders[-1] / "1.dcm")
    assert image_series([*folders, SERIES_DIR]) == [SERIES_DIR]
