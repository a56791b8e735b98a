"""Error replies are short, name no server path and never echo unbounded input; disconnects are quiet."""

from __future__ import annotations

import socket
import time

import numpy as np
import SimpleITK as sitk
from conftest import TOKENS

from service.errors import sanitise, short, validation_text


def test_sanitise_strips_paths_flattens_and_caps():
    text = "ITK ERROR: NrrdImageIO(0x55): Read: Error reading /tmp/tmpab/scans/case.nrrd:\n  ideal = 8192"
    assert sanitise(text) == "ITK ERROR: NrrdImageIO(0x55): Read: Error reading case.nrrd: ideal = 8192"
    assert sanitise("file '/srv/data/x.nii.gz' and \"/a/b/\"") == "file 'x.nii.gz' and \"…\""
    kept = "send multipart/form-data or application/json; model `name:version`; 1/2"
    assert sanitise(kept) == kept
    assert len(sanitise("x" * 10_000)) <= 301


def test_short_bounds_and_cleans_echoed_input():
    assert short("a" * 10_000) == "a" * 64 + "…"
    assert short("ab\x00\x1b[31m") == "ab??[31m"


def test_validation_text_groups_unknown_fields_and_counts_the_rest():
    errors = [{"type": "extra_forbidden", "loc": ("body", f"f{n}"), "msg": "x"} for n in range(9000)]
    errors += [{"type": "int_parsing", "loc": ("query", "limit"), "msg": "not an integer"}] * 7
    text = validation_text(errors)
    assert text.startswith("unknown fields: f0, f1, f2, f3, f4 and 8995 more; limit: not an integer")
    assert text.endswith("and 3 more problems") and len(text) < 300


def _submit_raw(stack, path, name: str) -> dict:
    with stack.client() as http:
        answer = http.post(
            "/v1/jobs", data={"model": "phantom"}, files=[("files", (name, path.read_bytes()))]
        )
    assert 400 <= answer.status_code < 500, answer.text
    return answer.json()


def test_reader_errors_name_no_server_path(stack, tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 16, 16)).astype(np.float32))
    nrrd = tmp_path / "cut.nrrd"
    sitk.WriteImage(image, str(nrrd))
    nrrd.write_bytes(nrrd.read_bytes()[:1500])
    detail = _submit_raw(stack, nrrd, "cut.nrrd")["detail"]
    assert "cut.nrrd" in detail and "/tmp" not in detail and str(stack.root) not in detail, detail
    assert "\n" not in detail and len(detail) <= 301


def test_headers_pointing_at_server_files_are_refused(stack, tmp_path):
    mha = tmp_path / "linked.mha"
    mha.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n")
    mha.write_bytes(mha.read_bytes() + b"ElementDataFile = /etc/passwd\n")
    nrrd = tmp_path / "linked.nrrd"
    nrrd.write_bytes(
        b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/passwd\n\n"
    )
    for path in (mha, nrrd):
        detail = _submit_raw(stack, path, path.name)["detail"]
        assert "voxel data in another file" in detail and "passwd" not in detail, detail


def test_client_disconnecting_mid_body_is_one_log_line(stack):
    log = next(p for p in reversed(stack._logs) if p.name.startswith("api"))
    start = log.stat().st_size
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as conn:
        conn.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['alice']}\r\n"
            "Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 5000000\r\n\r\n".encode()
            + b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.nii.gz"\r\n\r\n'
            + b"\0" * 100_000
        )
        time.sleep(0.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with log.open("rb") as fh:
            fh.seek(start)
            written = fh.read().decode(errors="replace")
        if "client disconnected" in written:
            break
        time.sleep(0.3)
    assert written.count("client disconnected") == 1, written
    assert "Traceback" not in written and "ClientDisconnect" not in written, written
    with stack.client() as http:
        assert http.get("/healthz").status_code == 200


def test_long_ids_are_not_echoed_in_full(stack):
    with stack.client() as http:
        job = http.get("/v1/jobs/" + "j" * 10_000)
        scan = http.get("/v1/jobs/abc/scans/" + "s" * 5_000 + "/volumes")
    assert job.status_code == 404 and scan.status_code == 404
    assert job.json()["detail"] == "job " + "j" * 64 + "… not found"
    assert len(scan.json()["detail"]) < 100
