"""PACS integration: pull from and push back to a real Orthanc over DICOMweb, and Orthanc pushing a study
to the service's STOW-RS receiver (the API); plus the receiver's HTTP answers for bad requests."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import TOKENS, api_keys_setting
from dicomweb_client import DICOMwebClient
from fastapi.testclient import TestClient
from orthanc import Orthanc, Receiver, free_port, missing_orthanc  # api_tests/orthanc.py

from service.app import create_app
from service.config import Settings
from service.db import Database, Job
from service.dicom_seg import read_dicom_seg, write_dicom_seg
from service.dicomweb import DicomWebError, fetch_study, incoming_study_series, pacs_client, push_instances

SERIES_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/dicom/prostate3t_t2/Prostate3T-03-0001"
BOUNDARY = "ttaseg-test-boundary"

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")
needs_series = pytest.mark.skipif(not SERIES_DIR.is_dir(), reason=f"test series missing: {SERIES_DIR}")


def read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def stow_body(parts: list[bytes]) -> bytes:
    body = b"".join(
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc holding the test series, and the service's receiver registered in Orthanc as ``ttaseg``."""
    if missing_orthanc():
        pytest.skip(missing_orthanc())
    if not SERIES_DIR.is_dir():
        pytest.skip(f"test series missing: {SERIES_DIR}")
    workdir = tmp_path_factory.mktemp("pacs")
    receiver_port = free_port()
    servers = {"ttaseg": (f"http://127.0.0.1:{receiver_port}/dicomweb/", TOKENS["alice"])}
    with (
        Orthanc(workdir / "orthanc", servers) as orthanc,
        Receiver(workdir / "receiver", api_keys_setting(), receiver_port) as receiver,
    ):
        answers = orthanc.upload(sorted(SERIES_DIR.glob("*.dcm")))
        study_uid = str(
            pydicom.dcmread(next(SERIES_DIR.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        )
        yield orthanc, receiver, study_uid, answers[0]["ParentStudy"]


@pytest.fixture
def pacs_api(pacs) -> DICOMwebClient:
    """DICOMweb client of the test Orthanc, built from the service settings."""
    return pacs_client(Settings(dicomweb_url=pacs[0].dicomweb_url))


def test_fetch_study_pulls_the_series_on_the_same_grid(
    pacs, pacs_api: DICOMwebClient, tmp_path: Path
) -> None:
    _, _, study_uid, _ = pacs
    folders = fetch_study(study_uid, tmp_path, pacs_api)
    source = read_series(SERIES_DIR)
    assert len(folders) == 1
    assert len(list(folders[0].glob("*.dcm"))) == len(list(SERIES_DIR.glob("*.dcm")))
    pulled = read_series(folders[0])
    assert pulled.GetSize() == source.GetSize()
    assert np.allclose(pulled.GetSpacing(), source.GetSpacing())
    assert np.allclose(pulled.GetOrigin(), source.GetOrigin())
    assert np.allclose(pulled.GetDirection(), source.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(pulled), sitk.GetArrayViewFromImage(source))


def test_fetch_study_errors(pacs, pacs_api: DICOMwebClient, tmp_path: Path) -> None:
    with pytest.raises(DicomWebError, match="not found") as unknown:
        fetch_study("1.2.3.4.5", tmp_path, pacs_api)
    assert unknown.value.status_code == 404
    nowhere = pacs_client(Settings(dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web"))
    with pytest.raises(DicomWebError, match="cannot be reached") as unreachable:
        fetch_study(pacs[2], tmp_path, nowhere)
    assert unreachable.value.status_code == 503
    with pytest.raises(DicomWebError, match="no PACS is configured") as unset:
        pacs_client(Settings(dicomweb_url=""))
    assert unset.value.status_code == 503


def test_seg_pushed_back_to_orthanc_references_and_decodes(
    pacs, pacs_api: DICOMwebClient, tmp_path: Path
) -> None:
    orthanc, _, study_uid, _ = pacs
    series_dir = fetch_study(study_uid, tmp_path / "pulled", pacs_api)[0]
    image = read_series(series_dir)
    expected = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    expected[4:12, 150:230, 160:240] = 1
    expected[8:10, 100:120, 100:130] = 2
    label = sitk.GetImageFromArray(expected)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    seg_path = write_dicom_seg(
        tmp_path / "label.nii.gz", series_dir, {1: "prostate", 2: "lesion"}, tmp_path / "seg.dcm"
    )
    push_instances([seg_path], pacs_api)

    client = DICOMwebClient(orthanc.dicomweb_url)
    found = client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": "SEG"})
    assert len(found) == 1
    seg_series = pydicom.Dataset.from_json(found[0]).SeriesInstanceUID
    [instance] = client.search_for_instances(study_uid, seg_series)
    sop_uid = pydicom.Dataset.from_json(instance).SOPInstanceUID
    seg = client.retrieve_instance(study_uid, seg_series, sop_uid)
    source_series = pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_series
    seg.save_as(tmp_path / "retrieved.dcm", enforce_file_format=True)
    assert np.array_equal(read_dicom_seg(tmp_path / "retrieved.dcm", series_dir), expected)
    # the SEG now in the study is not pulled as an image series
    assert [f.name for f in fetch_study(study_uid, tmp_path / "again", pacs_api)] == [source_series]


def test_orthanc_pushes_the_study_to_the_service(pacs) -> None:
    orthanc, receiver, study_uid, orthanc_study = pacs
    orthanc.post("/dicom-web/servers/ttaseg/stow", {"Resources": [orthanc_study]})
    source_uids = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in SERIES_DIR.glob("*.dcm")
    }
    series_uid = str(
        pydicom.dcmread(next(SERIES_DIR.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    )
    series_dir = receiver.storage_dir / "incoming" / "alice" / study_uid / series_uid
    assert {f.stem for f in series_dir.glob("*.dcm")} == source_uids
    status = httpx.get(f"{receiver.url}/dicomweb/studies/{study_uid}", headers=_auth("alice")).json()
    assert {"series_instance_uid": series_uid, "instances": len(source_uids)} in status["series"]
    assert httpx.get(f"{receiver.url}/dicomweb/studies/{study_uid}", headers=_auth("bob")).status_code == 404
    assert httpx.get(f"{receiver.url}/dicomweb/studies/{study_uid}").status_code == 401


@pytest.fixture
def receiver_client(tmp_path: Path):
    """In-process API storing under tmp_path/storage, calling as alice."""
    settings = Settings(
        data_dir=tmp_path / "data", storage_dir=tmp_path / "storage", api_keys=api_keys_setting()
    )
    with TestClient(create_app(settings), headers=_auth("alice")) as client:
        yield client


@needs_series
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_receiver_stores_instances_and_reports_failures(receiver_client: TestClient, tmp_path: Path) -> None:
    files = sorted(SERIES_DIR.glob("*.dcm"))[:2]
    response = receiver_client.post(
        "/dicomweb/studies",
        content=stow_body([f.read_bytes() for f in files]),
        headers={"Content-Type": STOW_TYPE},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(response.json())
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence} == {
        str(ds.SOPInstanceUID) for ds in sources
    }
    [series] = incoming_study_series(tmp_path / "storage", "alice", str(sources[0].StudyInstanceUID))
    assert sorted(f.stem for f in series.glob("*.dcm")) == sorted(str(ds.SOPInstanceUID) for ds in sources)

    broken = pydicom.dcmread(files[0])
    broken.SOPInstanceUID = "../../escape"
    encoded = BytesIO()
    broken.save_as(encoded, enforce_file_format=True)
    body = stow_body([files[1].read_bytes(), encoded.getvalue()])
    response = receiver_client.post("/dicomweb/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 202
    answer = pydicom.Dataset.from_json(response.json())
    assert len(answer.ReferencedSOPSequence) == 1
    assert answer.FailedSOPSequence[0].FailureReason == 0xC000
    assert not list(series.parents[3].rglob("*escape*"))


def test_receiver_rejects_bad_requests(receiver_client: TestClient) -> None:
    response = receiver_client.post(
        "/dicomweb/studies", content=b"{}", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 415
    response = receiver_client.post(
        "/dicomweb/studies", content=stow_body([b"not dicom"]), headers={"Content-Type": STOW_TYPE}
    )
    assert response.status_code == 400
    assert "part 1" in response.json()["detail"]
    assert receiver_client.get("/dicomweb/studies/1.2.3").status_code == 404
    assert receiver_client.get("/dicomweb/studies/1.2.x").status_code == 400


def test_push_route_answers(receiver_client: TestClient, tmp_path: Path) -> None:
    db = Database(Settings(data_dir=tmp_path / "data").resolved_database_url)
    fields = dict(client_id="alice", model_ref="m", bundle_name="m", bundle_version="1", labels={})
    fields |= dict(adaptation="none", queue="cpu", attempts=0, progress=0.0, state="succeeded")
    with db.session() as session:
        session.add(Job(id="u" * 32, source="upload", **fields))
        session.add(Job(id="d" * 32, source="dicomweb", study_uid="1.2.3", **fields))
        session.commit()
    upload = receiver_client.post(f"/v1/jobs/{'u' * 32}/push")
    assert upload.status_code == 409 and "upload" in upload.json()["detail"]
    assert receiver_client.get(f"/v1/jobs/{'u' * 32}").json()["push"] == {
        "state": "none",
        "error": None,
        "attempts": 0,
        "pushed_at": None,
    }
    assert receiver_client.post(f"/v1/jobs/{'d' * 32}/push").status_code == 503  # no PACS configured
    assert receiver_client.post(f"/v1/jobs/{'d' * 32}/push", headers=_auth("bob")).status_code == 404
