"""Round trip with a real Orthanc: a real LGE scan as a DICOM MR study goes from Orthanc to the service
(STOW-RS), a job segments it, and the worker pushes its DICOM SEG and measurement SR back into the study.

The failure path: Orthanc down at push time leaves the job succeeded with ``push_failed``; once Orthanc is
back, ``POST /v1/jobs/{id}/push`` stores the results, and pushing again replaces rather than duplicates.
And Orthanc forwarding a stable study by itself (Lua script of deploy/orthanc/), which the routing rules
start once it is quiet.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import REPO, TOKENS, Stack
from dicomweb_client import DICOMwebClient
from orthanc import Orthanc, missing_orthanc  # api_tests/orthanc.py
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from service.dicom_seg import read_dicom_seg
from service.dicom_sr import read_volumes
from service.routing import site_domain
from workers.pushback import object_uids

FORWARD_SCRIPT = REPO / "deploy" / "orthanc" / "ttaseg-forward.lua"
LGE_SCAN = "cardiac/mscmr_lge/images/subject41_lge.nii.gz"  # 400 x 400 x 15, oblique
MODEL = "cardiac-bssfp"
AUTO_STATION = "MR2"  # the routing rule of the tests matches only this station

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")


def nifti_to_dicom_series(nifti: Path, out_dir: Path, study_uid: str, station: str = "MR1") -> list[Path]:
    """Write a 3D NIfTI scan as a single-frame MR series with its geometry (one file per slice)."""
    image = sitk.ReadImage(str(nifti))
    array = sitk.GetArrayFromImage(image).astype(np.int16)  # (z, y, x)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    series_uid, frame_uid = generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, pixels in enumerate(array):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Roundtrip^LGE", "LGE41", "", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", ""
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, 3, "MR"
        ds.SeriesDescription = "LGE short axis"
        ds.Manufacturer, ds.InstitutionName, ds.StationName = "Philips", "Test site", station
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "2D", 2.0, 5.0, 1
        ds.ImageOrientationPatient = [*direction[:, 0].tolist(), *direction[:, 1].tolist()]
        ds.ImagePositionPatient = list(image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        path = out_dir / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of dciodvfy for a file (warnings are allowed)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def wait_push(stack: Stack, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    """Poll a job until its push state is in ``states``."""
    deadline = time.monotonic() + timeout
    with stack.client() as http:
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["push"]["state"] in states:
                return job
            time.sleep(0.3)
    raise AssertionError(f"push of {job_id} not in {states}: {job['push']}\n{stack.logs()}")


@pytest.fixture(scope="module")
def site(tmp_path_factory, bundle_root, redis_server, data_root):
    """Orthanc holding the converted LGE study, and the service (API + worker) pushing results to it."""
    if missing_orthanc():
        pytest.skip(missing_orthanc())
    if not (bundle_root / MODEL).is_dir():
        pytest.skip(f"bundle {MODEL} missing")
    root = tmp_path_factory.mktemp("roundtrip")
    study_uid = generate_uid()
    series = nifti_to_dicom_series(data_root / LGE_SCAN, root / "series", study_uid)
    (root / "stack").mkdir()
    rules = root / "stack" / "routing.yaml"
    rules.write_text(f"- match: {{StationName: {AUTO_STATION}}}\n  model: {MODEL}\n  adaptation: none\n")
    stack = Stack(
        root / "stack",
        bundle_root,
        redis_server,
        push_retry_interval=3600,
        routing_rules=rules,
        study_quiet_seconds=2,
    )
    orthanc = Orthanc(root / "orthanc", {"ttaseg": (f"{stack.base_url}/dicomweb/", TOKENS["alice"])})
    stack.env["TTASEG_DICOMWEB_URL"] = orthanc.dicomweb_url
    try:
        with orthanc:
            orthanc_study = orthanc.upload(series)[0]["ParentStudy"]
            stack.start_api()
            stack.start_worker()
            orthanc.post("/dicom-web/servers/ttaseg/stow", {"Resources": [orthanc_study]})
            yield stack, orthanc, study_uid, root / "series"
    finally:
        stack.close()


def submit_study(stack: Stack, study_uid: str) -> dict:
    """Post a job on the study and wait until it ends."""
    with stack.client() as http:
        response = http.post("/v1/jobs", json={"study_uid": study_uid, "model": MODEL, "adaptation": "none"})
    assert response.status_code == 202, response.text
    return stack.wait_job(response.json()["id"], timeout=300)


def instances(pacs: DICOMwebClient, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    """QIDO-RS: the instances of one modality in the study."""
    found = pacs.search_for_instances(study_uid, search_filters={"Modality": modality})
    return [pydicom.Dataset.from_json(item) for item in found]


def test_results_pushed_back_into_the_study(site, tmp_path: Path) -> None:
    stack, orthanc, study_uid, series_dir = site
    job = submit_study(stack, study_uid)
    assert job["state"] == "succeeded", job
    job = wait_push(stack, job["id"], ("pushed", "push_failed"))
    assert job["push"]["state"] == "pushed", job["push"]
    assert job["push"]["pushed_at"] and job["push"]["error"] is None
    [scan] = job["scans"]
    with stack.client() as http:
        (tmp_path / "label.nii.gz").write_bytes(http.get(scan["links"]["segmentation"]).content)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "label.nii.gz")))

    pacs = DICOMwebClient(orthanc.dicomweb_url)
    [seg_meta] = instances(pacs, study_uid, "SEG")
    [sr_meta] = instances(pacs, study_uid, "SR")
    seg_series, seg_uid = object_uids(job["id"], scan["name"], "seg")
    sr_series, sr_uid = object_uids(job["id"], scan["name"], "sr")
    assert (seg_meta.SeriesInstanceUID, seg_meta.SOPInstanceUID) == (seg_series, seg_uid)
    assert (sr_meta.SeriesInstanceUID, sr_meta.SOPInstanceUID) == (sr_series, sr_uid)

    seg = pacs.retrieve_instance(study_uid, seg_series, seg_uid)
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    # segments are numbered in ascending label value: labels 1..3 keep their values
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == list(scan["volumes_ml"])
    decoded = read_dicom_seg(tmp_path / "seg.dcm", series_dir)
    assert decoded.shape == expected.shape
    assert np.array_equal(decoded, expected)
    assert expected.any()

    sr = pacs.retrieve_instance(study_uid, sr_series, sr_uid)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert read_volumes(tmp_path / "sr.dcm") == pytest.approx(scan["volumes_ml"])

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install -y dicom3tools)")
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []


def test_push_failure_is_reported_and_retried(site) -> None:
    stack, orthanc, study_uid, _ = site
    orthanc.__exit__()
    try:
        job = submit_study(stack, study_uid)
        assert job["state"] == "succeeded", job
        job = wait_push(stack, job["id"], ("pushed", "push_failed"))
    finally:
        orthanc.__enter__()
    assert job["state"] == "succeeded"
    assert job["push"]["state"] == "push_failed"
    assert "cannot be reached" in job["push"]["error"]

    with stack.client("bob") as http:
        assert http.post(f"/v1/jobs/{job['id']}/push").status_code == 404
    with stack.client() as http:
        for _ in range(2):
            response = http.post(f"/v1/jobs/{job['id']}/push")
            assert response.status_code == 202, response.text
            assert response.json()["push"]["state"] == "pending"
            pushed = wait_push(stack, job["id"], ("pushed", "push_failed"))
            assert pushed["push"]["state"] == "pushed", pushed["push"]
    pacs = DICOMwebClient(orthanc.dicomweb_url)
    [scan] = job["scans"]
    for kind, modality in (("seg", "SEG"), ("sr", "SR")):
        series_uid, sop_uid = object_uids(job["id"], scan["name"], kind)
        mine = [ds for ds in instances(pacs, study_uid, modality) if ds.SeriesInstanceUID == series_uid]
        assert [ds.SOPInstanceUID for ds in mine] == [sop_uid]


def test_orthanc_forwards_stable_studies_which_start_by_themselves(site, data_root, tmp_path: Path) -> None:
    stack = site[0]
    study_uid = generate_uid()
    series = nifti_to_dicom_series(data_root / LGE_SCAN, tmp_path / "series", study_uid, AUTO_STATION)
    servers = {"ttaseg": (f"{stack.base_url}/dicomweb/", TOKENS["alice"])}
    extra = {"StableAge": 1, "LuaScripts": [str(FORWARD_SCRIPT)]}
    with Orthanc(tmp_path / "orthanc", servers, extra) as forwarding, stack.client() as http:
        forwarding.upload(series)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = http.get(f"/dicomweb/studies/{study_uid}")
            if status.status_code == 200 and status.json()["start"]["state"] == "started":
                break
            time.sleep(0.5)
        else:
            raise AssertionError(
                f"study not started: {status.text}\n{forwarding.log_path.read_text()[-2000:]}"
            )
    assert status.json()["instances"] == len(series)
    job = stack.wait_job(status.json()["start"]["job_id"], timeout=300)
    assert job["state"] == "succeeded", job
    header = pydicom.dcmread(series[0], stop_before_pixels=True)
    assert (job["study_uid"], job["model"], job["adaptation"]) == (study_uid, MODEL, "none")
    assert job["domain"] == site_domain(header)
    assert wait_push(stack, job["id"], ("pushed", "push_failed"))["push"]["state"] == "pushed"
    with stack.client() as http:  # the studies of the other tests match no rule
        other = http.get(f"/dicomweb/studies/{site[2]}").json()["start"]
    assert other["state"] == "unrouted" and other["job_id"] is None
