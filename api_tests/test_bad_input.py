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


def _form(*parts: tuple[bytes, bytes], boundary: bytes = b"B") -> bytes:
    """A multipart body from (Content-Disposition parameters, content) pairs."""
    body = b"".join(
        b"--"
        + boundary
        + b"\r\nContent-Disposition: form-data; "
        + disposition
        + b"\r\n\r\n"
        + content
        + b"\r\n"
        for disposition, content in parts
    )
    return body + b"--" + boundary + b"--\r\n"


MULTIPART = {"Content-Type": "multipart/form-data; boundary=B"}
STUDY = {"study_uid": "1.2.3", "model": "phantom"}


def _more_bad_requests(
    http: httpx.Client, anonymous: httpx.Client, job: dict
) -> list[tuple[str, httpx.Response, int, str]]:
    """(kind, answer, expected status, substring of the reason) for requests of many other bad kinds."""
    scan = job["scans"][0]["name"]
    base = f"/v1/jobs/{job['id']}/scans/{scan}"
    unknown_fields = [(f'name="field{n}"'.encode(), b"1") for n in range(9000)]
    return [
        (
            "empty boundary",
            http.post("/v1/jobs", content=b"x", headers={"Content-Type": "multipart/form-data; boundary="}),
            400,
            "boundary",
        ),
        ("no content type", http.post("/v1/jobs", content=b"\x00" * 16), 415, "multipart"),
        (
            "xml body",
            http.post("/v1/jobs", content=b"<job/>", headers={"Content-Type": "application/xml"}),
            415,
            "multipart",
        ),
        ("urlencoded form", http.post("/v1/jobs", data={"model": "phantom"}), 422, "no files"),
        ("JSON too large", http.post("/v1/jobs", json={**STUDY, "domain": "a" * 70_000}), 413, "JSON body"),
        (
            "deeply nested JSON",
            http.post("/v1/jobs", content=b"[" * 30_000, headers={"Content-Type": "application/json"}),
            400,
            "JSON",
        ),
        (
            "JSON not UTF-8",
            http.post(
                "/v1/jobs", content=b'{"model": "\xff\xfe"}', headers={"Content-Type": "application/json"}
            ),
            400,
            "JSON",
        ),
        (
            "JSON null",
            http.post("/v1/jobs", content=b"null", headers={"Content-Type": "application/json"}),
            422,
            "valid dictionary",
        ),
        ("JSON unknown field", http.post("/v1/jobs", json={**STUDY, "priority": 1}), 422, "unknown field"),
        (
            "study uid too long",
            http.post("/v1/jobs", json={**STUDY, "study_uid": "1." * 40 + "1"}),
            422,
            "study_uid",
        ),
        ("JSON negative steps", http.post("/v1/jobs", json={**STUDY, "steps": -5}), 422, "steps"),
        ("JSON huge steps", http.post("/v1/jobs", json={**STUDY, "steps": 10**30}), 422, "steps"),
        ("JSON fractional steps", http.post("/v1/jobs", json={**STUDY, "steps": 2.5}), 422, "steps"),
        ("unicode model", http.post("/v1/jobs", json={**STUDY, "model": "фантом\u202e"}), 422, "model"),
        (
            "study not available",
            http.post("/v1/jobs", json={**STUDY, "study_uid": "1.2.999"}),
            422,
            "upload the scans",
        ),
        (
            "field given twice",
            http.post(
                "/v1/jobs",
                content=_form((b'name="model"', b"phantom"), (b'name="model"', b"phantom")),
                headers=MULTIPART,
            ),
            422,
            "more than once",
        ),
        (
            "field not UTF-8",
            http.post("/v1/jobs", content=_form((b'name="model"', b"\xff\xfe\xfd")), headers=MULTIPART),
            422,
            "UTF-8",
        ),
        (
            "oversized field",
            http.post("/v1/jobs", content=_form((b'name="domain"', b"a" * 70_000)), headers=MULTIPART),
            413,
            "larger than",
        ),
        (
            "part without a name",
            http.post("/v1/jobs", content=_form((b'filename="a.nii.gz"', b"x")), headers=MULTIPART),
            400,
            "name",
        ),
        (
            "9000 unknown fields",
            http.post(
                "/v1/jobs", content=_form((b'name="model"', b"phantom"), *unknown_fields), headers=MULTIPART
            ),
            422,
            "8995 more",
        ),
        (
            "unicode domain",
            http.post(
                "/v1/jobs",
                data={"model": "phantom", "domain": "sité\u202e"},
                files=[("files", ("a.nii.gz", b"x"))],
            ),
            422,
            "domain",
        ),
        (
            "negative steps",
            http.post(
                "/v1/jobs", data={"model": "phantom", "steps": "-5"}, files=[("files", ("a.nii.gz", b"x"))]
            ),
            422,
            "steps",
        ),
        (
            "huge steps",
            http.post(
                "/v1/jobs",
                data={"model": "phantom", "steps": "9" * 40},
                files=[("files", ("a.nii.gz", b"x"))],
            ),
            422,
            "steps",
        ),
        (
            "empty adaptation",
            http.post(
                "/v1/jobs", data={"model": "phantom", "adaptation": ""}, files=[("files", ("a.nii.gz", b"x"))]
            ),
            422,
            "adaptation",
        ),
        (
            "very long model",
            http.post("/v1/jobs", data={"model": "a" * 5000}, files=[("files", ("a.nii.gz", b"x"))]),
            422,
            "model",
        ),
        ("negative offset", http.get("/v1/jobs", params={"offset": -1}), 422, "offset"),
        ("limit above 100", http.get("/v1/jobs", params={"limit": 101}), 422, "limit"),
        ("limit in exponent notation", http.get("/v1/jobs", params={"limit": "1e2"}), 422, "limit"),
        ("10,000-character job id", http.get("/v1/jobs/" + "j" * 10_000), 404, "not found"),
        ("NUL in job id", http.get("/v1/jobs/abc%00def"), 404, "not found"),
        ("unknown scan name", http.get(f"/v1/jobs/{job['id']}/scans/nope/volumes"), 404, "no scan"),
        (
            "5,000-character scan name",
            http.get(f"/v1/jobs/{job['id']}/scans/{'s' * 5000}/overlay.png"),
            404,
            "no scan",
        ),
        (
            "encoded path in scan name",
            http.get(f"/v1/jobs/{job['id']}/scans/..%2F..%2Fetc/volumes"),
            404,
            "not found",
        ),
        (
            "format in capitals",
            http.get(f"{base}/segmentation", params={"format": "DICOM-SEG"}),
            422,
            "format",
        ),
        ("format empty", http.get(f"{base}/segmentation", params={"format": ""}), 422, "format"),
        (
            "DICOM SEG of a NIfTI scan",
            http.get(f"{base}/segmentation", params={"format": "dicom-seg"}),
            409,
            "not DICOM",
        ),
        ("zero slices", http.get(f"{base}/overlay.png", params={"slices": 0}), 422, "slices"),
        ("too many slices", http.get(f"{base}/overlay.png", params={"slices": 13}), 422, "slices"),
        ("slices not a number", http.get(f"{base}/overlay.png", params={"slices": "all"}), 422, "slices"),
        ("cancel a finished job", http.delete(f"/v1/jobs/{job['id']}"), 409, "already"),
        ("PUT on the jobs collection", http.put("/v1/jobs", json=STUDY), 405, "not allowed"),
        ("PATCH a job", http.patch(f"/v1/jobs/{job['id']}", json={"state": "queued"}), 405, "not allowed"),
        ("POST to a job", http.post(f"/v1/jobs/{job['id']}", json=STUDY), 405, "not allowed"),
        ("unknown route", http.get("/v1/jobz"), 404, "not found"),
        (
            "bare Bearer scheme",
            anonymous.get("/v1/jobs", headers={"Authorization": "Bearer"}),
            401,
            "credentials",
        ),
        (
            "non-ASCII bearer token",
            anonymous.get("/v1/jobs", headers={"Authorization": "Bearer \xe9\xe9".encode("latin-1")}),
            401,
            "api key",
        ),
        (
            "10,000-character API key",
            anonymous.get("/v1/jobs", headers={"X-API-Key": "k" * 10_000}),
            401,
            "api key",
        ),
    ]


def test_more_bad_requests_leave_earlier_jobs_alone(stack, scan_dir):
    accepted = stack.submit(sorted(scan_dir.glob("*.nii.gz"))[:1], model="phantom", adaptation="none")
    assert accepted.status_code == 202, accepted.text
    job = stack.wait_job(accepted.json()["id"])
    assert job["state"] == "succeeded", job
    before = _job_total(stack)
    with stack.client() as http, stack.client(None) as anonymous:
        cases = _more_bad_requests(http, anonymous, job)
        assert len({kind for kind, *_ in cases}) >= 40
        failures = []
        for kind, response, status, reason in cases:
            detail = response.json().get("detail", "") if response.content else ""
            if response.status_code != status or reason.lower() not in detail.lower() or len(detail) > 300:
                failures.append(
                    f"{kind}: {response.status_code} (wanted {status}, {reason!r}) {response.text[:300]}"
                )
            if len(response.content) > 1024:
                failures.append(f"{kind}: a {len(response.content)}-byte answer")
        assert not failures, "\n".join(failures)
        assert http.get(f"/v1/jobs/{job['id']}").json() == job
    assert _job_total(stack) == before
