"""Every kind of bad request gets a 4xx with a reason, is never stored as a job, and never causes a 5xx."""

from __future__ import annotations

import gzip
import shutil
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import TOKENS
from scan_files import non_image_dicom, write_array, zip_folder, zip_of

PROSTATE = "dicom/prostate3t_t2/Prostate3T-03-000{}"


def _bad_cases(tmp: Path, scan: Path, data: Path | None) -> list[tuple[str, list[Path], dict, int, str]]:
    """(name, files, form fields, expected status, substring of the reason)."""
    good = {"model": "phantom", "adaptation": "none"}
    raw = tmp / "raw.nii"
    raw.write_bytes(gzip.decompress(scan.read_bytes()))
    (tmp / "trunc.nii.gz").write_bytes(scan.read_bytes()[: scan.stat().st_size // 2])
    (tmp / "trunc.nii").write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    (tmp / "notes.txt").write_text("not an image\n")
    (tmp / "empty.nii.gz").write_bytes(b"")
    (tmp / "garbage.zip").write_bytes(b"PK\x03\x04" + b"\x00garbage" * 50)
    rng = np.random.default_rng(0)
    cases = [
        ("truncated gzip NIfTI", [tmp / "trunc.nii.gz"], good, 422, "truncated"),
        ("truncated NIfTI", [tmp / "trunc.nii"], good, 422, "truncated"),
        ("not an image", [tmp / "notes.txt"], good, 415, "not a NIfTI"),
        ("empty file", [tmp / "empty.nii.gz"], good, 422, "empty"),
        ("no files", [], good, 422, "no files"),
        (
            "2D image",
            [write_array(tmp / "flat.nii.gz", rng.random((64, 64)).astype(np.float32))],
            good,
            422,
            "2D",
        ),
        (
            "4D image",
            [write_array(tmp / "four.nii.gz", rng.random((3, 8, 16, 16)).astype(np.float32))],
            good,
            422,
            "4D",
        ),
        (
            "NaN voxels",
            [
                write_array(
                    tmp / "nan.nii.gz",
                    np.where(rng.random((8, 16, 16)) > 0.5, np.nan, 1.0).astype(np.float32),
                )
            ],
            good,
            422,
            "NaN",
        ),
        (
            "constant image",
            [write_array(tmp / "const.nii.gz", np.ones((8, 16, 16), np.int16))],
            good,
            422,
            "constant",
        ),
        (
            "too many voxels",
            [
                write_array(
                    tmp / "huge.nii.gz", np.arange(128 * 256 * 256, dtype=np.int32).reshape(128, 256, 256) % 7
                )
            ],
            good,
            422,
            "voxels",
        ),
        ("non-image DICOM", [non_image_dicom(tmp / "sr.dcm")], good, 422, "DICOM"),
        ("bad zip", [tmp / "garbage.zip"], good, 422, "zip"),
        (
            "zip path traversal",
            [zip_of(tmp / "evil.zip", {"../../etc/passwd.dcm": b"x" * 300})],
            good,
            422,
            "unsafe",
        ),
        (
            "zip absolute path",
            [zip_of(tmp / "abs.zip", {"/etc/cron.d/x.dcm": b"x" * 300})],
            good,
            422,
            "unsafe",
        ),
        ("zip without images", [zip_of(tmp / "docs.zip", {"readme.txt": b"hello"})], good, 422, "no NIfTI"),
        ("too many scans", [scan] * 5, good, 422, "at most 4"),
        ("unknown model", [scan], {**good, "model": "no-such-model"}, 422, "unknown model"),
        ("model path", [scan], {**good, "model": "../../etc"}, 422, "model"),
        ("unknown adaptation", [scan], {**good, "adaptation": "magic"}, 422, "adaptation"),
        ("steps not an integer", [scan], {**good, "steps": "many"}, 422, "steps"),
        ("steps zero", [scan], {**good, "steps": "0"}, 422, "steps"),
        ("steps too many", [scan], {**good, "steps": "100000"}, 422, "steps"),
        ("bad domain", [scan], {**good, "domain": "site A/../b"}, 422, "domain"),
        ("unknown field", [scan], {**good, "adaption": "mpl"}, 422, "unknown field"),
        ("missing model", [scan], {"adaptation": "none"}, 422, "model"),
    ]
    if data is not None:
        one, two = data / PROSTATE.format(1), data / PROSTATE.format(2)
        mixed = tmp / "mixed"
        mixed.mkdir()
        shutil.copy(sorted(one.iterdir())[0], mixed / "a.dcm")
        shutil.copy(sorted(two.iterdir())[0], mixed / "b.dcm")
        cases.append(
            ("several series in one scan", sorted(mixed.iterdir()), good, 422, "several DICOM series")
        )
        cases.append(
            (
                "several series in one zip folder",
                [zip_folder(tmp / "mixed.zip", mixed)],
                good,
                422,
                "several DICOM series",
            )
        )
    return cases


def _job_total(stack) -> int:
    with stack.client() as http:
        return http.get("/v1/jobs").json()["total"]


def test_bad_uploads_are_refused_with_reasons(stack, scan_dir, tmp_path):
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    cases = _bad_cases(tmp_path, sorted(scan_dir.glob("*.nii.gz"))[0], data if data.is_dir() else None)
    assert len(cases) >= 15
    before = _job_total(stack)
    failures = []
    for name, files, fields, status, reason in cases:
        response = stack.submit(files, **fields)
        detail = (
            response.json().get("detail", "")
            if response.headers.get("content-type", "").startswith("application/json")
            else ""
        )
        if response.status_code != status or reason.lower() not in str(detail).lower():
            failures.append(f"{name}: {response.status_code} {response.text[:300]}")
    assert not failures, "\n".join(failures)
    assert _job_total(stack) == before


def test_malformed_requests(stack):
    before = _job_total(stack)
    with stack.client() as http:
        checks = [
            (http.post("/v1/jobs", content=b"hello", headers={"Content-Type": "text/plain"}), 415),
            (http.post("/v1/jobs", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}), 400),
            (
                http.post(
                    "/v1/jobs",
                    content=b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nphan',
                    headers={"Content-Type": "multipart/form-data; boundary=b"},
                ),
                400,
            ),
            (http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 400),
            (http.post("/v1/jobs", json={"study_uid": "1.2.3"}), 422),
            (http.post("/v1/jobs", json={"study_uid": "not-a-uid", "model": "phantom"}), 422),
            (http.post("/v1/jobs", json={"study_uid": "1.2.3", "model": "phantom", "adaptation": 3}), 422),
            (http.post("/v1/jobs", json=["a"]), 422),
            (http.post("/v1/jobs", data={"model": "phantom", "files": "not a file"}), 422),
            (http.post("/v1/jobs", data={"model": "phantom"}, files=[("scan", ("a.nii.gz", b"x"))]), 422),
            (http.get("/v1/jobs", params={"limit": 0}), 422),
            (http.get("/v1/jobs", params={"limit": "ten"}), 422),
            (http.get("/v1/jobs", params={"state": "sleeping"}), 422),
            (http.get("/v1/jobs/does-not-exist"), 404),
            (http.delete("/v1/jobs/does-not-exist"), 404),
            (http.get("/v1/jobs/x/scans/y/segmentation", params={"format": "png"}), 422),
        ]
    failures = [
        f"{r.request.method} {r.request.url}: {r.status_code} (wanted {want}) {r.text[:200]}"
        for r, want in checks
        if r.status_code != want or not r.json().get("detail")
    ]
    assert not failures, "\n".join(failures)
    assert _job_total(stack) == before


def test_upload_limit_enforced_while_streaming(stack, scan_dir):
    scan = sorted(scan_dir.glob("*.nii.gz"))[0]

    def body():
        yield (
            b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nphantom\r\n'
            b'--B\r\nContent-Disposition: form-data; name="files"; filename="big.nii.gz"\r\n\r\n'
        ) + scan.read_bytes()
        for _ in range(100):  # 100 MiB without Content-Length, above the 64 MiB limit
            yield b"\0" * (1024 * 1024)

    with stack.client() as http:
        try:
            response = http.post(
                "/v1/jobs", content=body(), headers={"Content-Type": "multipart/form-data; boundary=B"}
            )
            outcome = response.status_code, response.json()["detail"]
        except httpx.HTTPError as exc:  # the server may close the connection once it has answered
            outcome = 413, str(exc)
    assert outcome[0] == 413 and outcome[1], outcome
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as conn:
        token = TOKENS["alice"]
        conn.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {10**12}\r\n\r\n".encode()
        )
        status_line = conn.recv(4096).split(b"\r\n")[0]
    assert b" 413 " in status_line
    assert not any((stack.root / "data" / "storage" / ".scratch").iterdir())  # staging cleaned up


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": "Basic YWxpY2U6eA=="}],
)
def test_unauthenticated_requests_get_401(stack, headers):
    for method, path in [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/models"),
        ("GET", "/v1/jobs/abc"),
        ("DELETE", "/v1/jobs/abc"),
    ]:
        response = httpx.request(method, stack.base_url + path, headers=headers, timeout=30)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["detail"]
