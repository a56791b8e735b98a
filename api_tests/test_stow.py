"""STOW-RS receive: pushed studies belong to the pushing client, bodies are streamed to disk part by part
(memory of the API measured on a real process), bad bodies get a reason, and the settings' storage is used."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from io import BytesIO
from pathlib import Path

import psutil
import pydicom
import pytest
from conftest import DATA, TOKENS, Stack, api_keys_setting
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from starlette.requests import ClientDisconnect

from service.app import create_app
from service.config import Settings, get_settings
from service.dicomweb import incoming_dir
from service.errors import ApiError
from service.multipart import parse_multipart, read_parts

SERIES_ROOT = DATA / "dicom" / "prostate3t_t2"
BOUNDARY = b"ttaseg-stow-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'
MB = 1024**2

pytestmark = [
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent"),
    pytest.mark.skipif(not SERIES_ROOT.is_dir(), reason=f"test series missing: {SERIES_ROOT}"),
]


def series_files(number: int) -> list[Path]:
    return sorted((SERIES_ROOT / f"Prostate3T-03-000{number}").glob("*.dcm"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stow_chunks(parts: Iterable[bytes | Iterable[bytes]], boundary: bytes = BOUNDARY) -> Iterator[bytes]:
    """A STOW-RS body, one part at a time; a part is bytes or an iterable of byte chunks."""
    for part in parts:
        yield b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
        yield from [part] if isinstance(part, bytes) else part
        yield b"\r\n"
    yield b"--" + boundary + b"--\r\n"


def stow_body(parts: list[bytes], boundary: bytes = BOUNDARY) -> bytes:
    return b"".join(stow_chunks(parts, boundary))


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


def encode(ds: pydicom.Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def app_client(tmp_path: Path, **settings: object) -> TestClient:
    """In-process API (its own data and storage folders under tmp_path) calling as alice."""
    defaults = {"data_dir": tmp_path / "data", "storage_dir": tmp_path / "storage"}
    config = Settings(api_keys=api_keys_setting(), **{**defaults, **settings})
    return TestClient(create_app(config), headers=auth("alice"))


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    with app_client(tmp_path) as client:
        yield client


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary="a:b c=d"', b"a:b c=d"),
        ("Multipart/Related; boundary=plain-123; type=application/dicom", b"plain-123"),
        ('multipart/related; boundary="plain-123"', b"plain-123"),
    ],
)
def test_instances_are_stored_byte_for_byte(
    api: TestClient, tmp_path: Path, content_type: str, boundary: bytes
) -> None:
    files = series_files(1)[:3]
    body = stow_body([f.read_bytes() for f in files], boundary)
    response = api.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    stored = {p.stem: sha256(p) for p in (tmp_path / "storage" / "incoming" / "alice").rglob("*.dcm")}
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): sha256(f) for f in files}
    assert stored == expected
    assert not list((tmp_path / "storage" / ".scratch").iterdir())


def test_settings_storage_dir_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTASEG_STORAGE_DIR", str(tmp_path / "from-env"))
    get_settings.cache_clear()
    try:
        with app_client(tmp_path, storage_dir=tmp_path / "custom") as client:
            file = series_files(1)[0]
            response = client.post(
                "/dicomweb/studies",
                content=stow_body([file.read_bytes()]),
                headers={"Content-Type": STOW_TYPE},
            )
    finally:
        get_settings.cache_clear()
    assert response.status_code == 200, response.text
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    target = tmp_path / "custom" / "incoming" / "alice" / ds.StudyInstanceUID / ds.SeriesInstanceUID
    assert (target / f"{ds.SOPInstanceUID}.dcm").read_bytes() == file.read_bytes()
    assert not (tmp_path / "from-env").exists()


LONG = "x" * 5000
BAD_BODIES = [
    (b"{}", "application/json", 415, "multipart/related"),
    (b"", f"application/{LONG}", 415, "multipart/related"),
    (b"", 'multipart/related; type="application/dicom+json"; boundary=x', 415, "application/dicom parts"),
    (b"", 'multipart/related; type="application/dicom"', 400, "no boundary"),
    (b"", f"multipart/related; boundary={LONG}", 400, "boundary is longer"),
    (
        stow_body([b"\0" * 200 + b"garbage"], b"x"),
        "multipart/related; boundary=x",
        400,
        "part 1 is not a DICOM",
    ),
    (stow_body([b"junk"], b"x")[:-8], "multipart/related; boundary=x", 400, "truncated"),
    (b"--x--\r\n", "multipart/related; boundary=x", 400, "no DICOM instances"),
    (b"random bytes", "multipart/related; boundary=x", 400, "malformed"),
    (
        b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n",
        "multipart/related; boundary=x",
        415,
        "part 1",
    ),
    (
        b"--x\r\n"
        + b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 4000) for n in range(5))
        + b"\r\nhi\r\n--x--\r\n",
        "multipart/related; boundary=x",
        400,
        "bytes of headers",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "reason"), BAD_BODIES)
def test_bad_bodies_get_a_short_reason(
    api: TestClient, tmp_path: Path, body: bytes, content_type: str, status: int, reason: str
) -> None:
    response = api.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
    detail = response.json()["detail"]
    assert response.status_code == status and reason in detail, (response.status_code, detail)
    assert str(tmp_path) not in detail and len(detail) < 300
    assert not list((tmp_path / "storage").rglob("*.dcm"))
    assert not list((tmp_path / "storage" / ".scratch").iterdir())


def test_too_many_parts_and_too_large(tmp_path: Path) -> None:
    file = series_files(1)[0].read_bytes()
    with app_client(tmp_path, max_upload_bytes=2 * len(file)) as client:
        chunked = client.post(
            "/dicomweb/studies", content=stow_chunks([file] * 3), headers={"Content-Type": STOW_TYPE}
        )
        declared = client.post(
            "/dicomweb/studies", content=stow_body([file] * 3), headers={"Content-Type": STOW_TYPE}
        )
    assert chunked.status_code == 413 and "larger than the limit" in chunked.json()["detail"]
    assert declared.status_code == 413
    empty = b"--x\r\nContent-Type: application/dicom\r\n\r\n\r\n"
    with app_client(tmp_path / "many") as client:
        response = client.post(
            "/dicomweb/studies",
            content=empty * 10_001 + b"--x--\r\n",
            headers={"Content-Type": "multipart/related; boundary=x"},
        )
    assert response.status_code == 413 and "too many parts" in response.json()["detail"]


def test_form_fields_held_in_memory_are_bounded(tmp_path: Path) -> None:
    field = b"--x\r\nContent-Disposition: form-data; name=f%d\r\n\r\n" + b"v" * 60_000 + b"\r\n"

    async def body() -> AsyncIterator[bytes]:
        for n in range(20):
            yield field % n
        yield b"--x--\r\n"

    with pytest.raises(ApiError) as refused:
        asyncio.run(parse_multipart("multipart/form-data; boundary=x", body(), tmp_path, 10 * MB))
    assert refused.value.status_code == 413 and "text fields" in refused.value.detail


def test_client_gone_mid_body_is_a_bad_request(tmp_path: Path) -> None:
    async def vanishing() -> AsyncIterator[bytes]:
        yield b"--x\r\nContent-Type: application/dicom\r\n\r\nDICM"
        raise ClientDisconnect

    with pytest.raises(ApiError) as refused:
        asyncio.run(
            read_parts(
                "multipart/related; boundary=x", vanishing(), tmp_path, max_bytes=MB, start=lambda part: True
            )
        )
    assert refused.value.status_code == 400 and "disconnected" in refused.value.detail


def test_unwritable_storage_fails_the_instance_with_one_log_line(
    api: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = series_files(1)[0]
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    blocker = incoming_dir(tmp_path / "storage", "alice") / ds.StudyInstanceUID
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"a file where the study folder should be")
    with caplog.at_level(logging.WARNING, logger="service.dicomweb"):
        response = api.post(
            "/dicomweb/studies", content=stow_body([file.read_bytes()]), headers={"Content-Type": STOW_TYPE}
        )
    assert response.status_code == 409
    answer = pydicom.Dataset.from_json(response.json())
    assert answer.FailedSOPSequence[0].FailureReason == 0xA700
    assert str(tmp_path) not in response.text
    [record] = [r for r in caplog.records if r.name == "service.dicomweb"]
    assert ds.SOPInstanceUID in record.getMessage() and record.exc_info is None


def test_client_ids_map_to_safe_folders(tmp_path: Path) -> None:
    assert incoming_dir(tmp_path, "alice") == tmp_path / "incoming" / "alice"
    for unsafe in ("../alice", "a/b", ".hidden", "x" * 65):
        folder = incoming_dir(tmp_path, unsafe)
        assert folder.parent == tmp_path / "incoming" and folder.name.startswith("~")


def test_pushed_study_belongs_to_the_pushing_client(stack: Stack) -> None:
    files = series_files(4)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    incoming = stack.root / "data" / "storage" / "incoming"
    job_request = {"study_uid": study, "model": "phantom", "adaptation": "none"}
    with stack.client("alice") as alice, stack.client("bob") as bob:
        stored = alice.post(
            "/dicomweb/studies",
            content=stow_body([f.read_bytes() for f in files]),
            headers={"Content-Type": STOW_TYPE},
        )
        assert stored.status_code == 200, stored.text
        alice_files = {p.name: sha256(p) for p in (incoming / "alice" / study / series).iterdir()}
        assert len(alice_files) == len(files)
        assert alice.get(f"/dicomweb/studies/{study}").json()["instances"] == len(files)

        unknown = bob.get("/dicomweb/studies/1.2.826.0.1.3680043.99.1")
        assert bob.get(f"/dicomweb/studies/{study}").status_code == unknown.status_code == 404
        foreign = bob.post("/v1/jobs", json=job_request)
        never_pushed = bob.post("/v1/jobs", json={**job_request, "study_uid": "1.2.826.0.1.3680043.99.1"})
        assert foreign.status_code == never_pushed.status_code == 422
        assert foreign.json() == never_pushed.json()

        bob_parts = []
        for f in files:
            ds = pydicom.dcmread(f)
            ds.PatientName = "BOB^OVERWRITE"
            bob_parts.append(encode(ds))
        pushed = bob.post(
            "/dicomweb/studies", content=stow_body(bob_parts), headers={"Content-Type": STOW_TYPE}
        )
        assert pushed.status_code == 200, pushed.text
        assert {p.name: sha256(p) for p in (incoming / "alice" / study / series).iterdir()} == alice_files
        bob_files = sorted((incoming / "bob" / study / series).iterdir())
        assert sorted(p.read_bytes() for p in bob_files) == sorted(bob_parts)

        accepted = alice.post("/v1/jobs", json=job_request)
        assert accepted.status_code == 202, accepted.text
    job = stack.wait_job(accepted.json()["id"], timeout=300)
    assert job["state"] == "succeeded" and job["source"] == "dicomweb", job
    assert job["scans"][0]["files"] == len(files)
    with stack.client("alice") as alice:
        seg = alice.get(job["scans"][0]["links"]["dicom_seg"])
    assert seg.status_code == 200, seg.text
    assert pydicom.dcmread(BytesIO(seg.content)).PatientName == first.PatientName != "BOB^OVERWRITE"


def copies(source: Path, study: str, series: str, count: int) -> Iterator[bytes]:
    """``count`` copies of an instance, each with its own SOP Instance UID, in one new study and series."""
    placeholder = "2.25." + "1" * 39
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = placeholder
    template = encode(ds)
    for n in range(count):
        yield template.replace(placeholder.encode(), f"2.25.{10**38 + n}".encode())


def huge_private_instance(source: Path, study: str, series: str, size: int) -> Iterator[bytes]:
    """One instance with a private OB element of ``size`` bytes (even), produced in 1 MiB chunks."""
    marker = b"TTASEGPV"
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.private_block(0x0009, "TTASEG TEST", create=True).add_new(0x00, "OB", marker)
    encoded = encode(ds)
    at = encoded.index(marker)
    yield encoded[: at - 4] + size.to_bytes(4, "little")
    for start in range(0, size, MB):
        yield bytes(min(MB, size - start))
    yield encoded[at + len(marker) :]


class PeakRss(threading.Thread):
    """Samples a process's resident memory every 20 ms until stopped; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)


def push_measuring_rss(make_stack, total: int) -> tuple[int, int, float]:
    """Push ~``total`` bytes (copies of one instance plus one instance half that size) to a fresh API.

    Returns the instances stored, the API's peak RSS growth in bytes and the seconds the push took.
    """
    stack = make_stack(max_upload_bytes=2 * total)
    stack.start_api()
    source = series_files(5)[0]
    study, series = generate_uid(), generate_uid()
    count = total // 2 // source.stat().st_size
    with stack.client("alice") as http:
        warm = http.post(
            "/dicomweb/studies", content=stow_body([source.read_bytes()]), headers={"Content-Type": STOW_TYPE}
        )
        assert warm.status_code == 200, warm.text
        assert stack.api is not None
        sampler = PeakRss(stack.api.pid)
        baseline = sampler.peak
        sampler.start()
        started = time.monotonic()
        parts = [
            huge_private_instance(source, study, series, total // 2 // 2 * 2),
            *copies(source, study, series, count),
        ]
        response = http.post(
            "/dicomweb/studies", content=stow_chunks(parts), headers={"Content-Type": STOW_TYPE}, timeout=300
        )
        seconds = time.monotonic() - started
        sampler.done.set()
        sampler.join()
        assert response.status_code == 200, response.text
        status = http.get(f"/dicomweb/studies/{study}").json()
    return status["instances"], sampler.peak - baseline, seconds


def test_100_mb_push_is_streamed_to_disk(make_stack) -> None:
    stored, growth, seconds = push_measuring_rss(make_stack, 100 * MB)
    print(f"100 MB STOW-RS: {stored} instances in {seconds:.1f} s, API RSS +{growth / MB:.1f} MB")
    assert stored > 150
    assert growth <= 100 * MB


@pytest.mark.slow
def test_500_mb_push_is_streamed_to_disk(make_stack) -> None:
    stored, growth, seconds = push_measuring_rss(make_stack, 500 * MB)
    print(f"500 MB STOW-RS: {stored} instances in {seconds:.1f} s, API RSS +{growth / MB:.1f} MB")
    assert stored > 800
    assert growth <= 100 * MB
