"""Hostile scan files against the real API and worker: each is refused with a reason, naming no server path,
before any voxel is read; earlier jobs are untouched; the API's memory stays bounded whatever a file claims.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import Stack
from hostile_files import gzip_bomb, hostile_cases, nifti_header

SERVER_PATH = re.compile(r"(?<![\w.'])/(?:[\w.-]+/)+")
MEMORY_BUDGET = 200 * 1024**2


def _detail(response) -> str:
    if response.headers.get("content-type", "").startswith("application/json"):
        return str(response.json().get("detail", ""))
    return ""


def _accepted_job(stack: Stack, scan: Path) -> tuple[dict, str]:
    response = stack.submit([scan], model="phantom", adaptation="none")
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"])
    assert job["state"] == "succeeded", job
    with stack.client() as http:
        label = http.get(job["scans"][0]["links"]["segmentation"])
    assert label.status_code == 200
    return job, hashlib.sha256(label.content).hexdigest()


def test_hostile_files_are_refused_with_reasons(stack, scan_dir, tmp_path):
    earlier, label_digest = _accepted_job(stack, sorted(scan_dir.glob("*.nii.gz"))[0])
    with stack.client() as http:
        total = http.get("/v1/jobs").json()["total"]
    cases = hostile_cases(tmp_path)
    assert len({case.kind for case in cases}) >= 30
    failures = []
    for case in cases:
        response = stack.submit(case.files, model="phantom", adaptation="none")
        detail = _detail(response)
        reason = case.api_reason or case.reason
        if response.status_code != case.api_status or reason.lower() not in detail.lower():
            failures.append(f"{case.kind}: {response.status_code} {response.text[:300]}")
        elif str(tmp_path) in response.text or "/etc" in response.text or SERVER_PATH.search(detail):
            failures.append(f"{case.kind}: a server path in the reply: {response.text[:300]}")
        elif str(stack.root) in response.text:
            failures.append(f"{case.kind}: the service's folder in the reply: {response.text[:300]}")
    assert not failures, "\n".join(failures)
    with stack.client() as http:
        assert http.get("/v1/jobs").json()["total"] == total
        again = http.get(f"/v1/jobs/{earlier['id']}").json()
        label = http.get(again["scans"][0]["links"]["segmentation"])
    assert again["state"] == "succeeded" and again["scans"] == earlier["scans"]
    assert hashlib.sha256(label.content).hexdigest() == label_digest


@pytest.fixture(scope="module")
def roomy_stack(tmp_path_factory, bundle_root, redis_server) -> Iterator[Stack]:
    """An API alone (jobs stay queued) with the default voxel limit and room for large uploads."""
    stack = Stack(
        tmp_path_factory.mktemp("roomy-stack"),
        bundle_root,
        redis_server,
        max_upload_bytes=2 * 1024**3,
    )
    try:
        stack.start_api()
        yield stack
    finally:
        stack.close()


def _peak_growth(stack: Stack, send: Callable[[], object]) -> tuple[int, object]:
    """Largest rise of the API process's resident memory over its level before ``send()``, and its result."""
    assert stack.api is not None
    process = psutil.Process(stack.api.pid)
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = send()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return peak[0] - base, result


def _upload(stack: Stack, path: Path):
    with stack.client() as http, path.open("rb") as fh:
        return http.post(
            "/v1/jobs",
            data={"model": "phantom", "adaptation": "none"},
            files=[("files", (path.name, fh, "application/octet-stream"))],
            timeout=300,
        )


def _warm(stack: Stack, scan_dir: Path) -> None:
    """One accepted upload, so that the readers' libraries are loaded before measuring."""
    assert _upload(stack, sorted(scan_dir.glob("*.nii.gz"))[0]).status_code == 202


def test_gzip_bomb_does_not_grow_the_api(roomy_stack, scan_dir, tmp_path):
    _warm(roomy_stack, scan_dir)
    bomb = gzip_bomb(tmp_path / "bomb.nii.gz", 1024**3, shape=(64, 64, 64))
    assert bomb.stat().st_size < 2 * 1024**2
    growth, response = _peak_growth(roomy_stack, lambda: _upload(roomy_stack, bomb))
    print(f"gzip bomb {bomb.stat().st_size} bytes -> 1 GiB: API RSS +{growth / 1024**2:.1f} MiB")
    assert response.status_code == 422 and "inflates" in response.json()["detail"]
    assert growth <= MEMORY_BUDGET, f"+{growth / 1024**2:.0f} MiB"


def test_large_scan_within_limits_does_not_grow_the_api(roomy_stack, scan_dir, tmp_path):
    _warm(roomy_stack, scan_dir)
    shape = (512, 512, 500)  # 131 M voxels, within the default 512^3; 262 MB of int16
    path = tmp_path / "large.nii"
    ramp = np.add.outer(np.arange(shape[1]), np.arange(shape[0])).astype("<i2")
    with path.open("wb") as out:
        out.write(nifti_header(shape, "<i2"))
        for z in range(shape[2]):
            out.write((ramp + z).tobytes())
    growth, response = _peak_growth(roomy_stack, lambda: _upload(roomy_stack, path))
    print(f"{path.stat().st_size} byte scan within the limits: API RSS +{growth / 1024**2:.1f} MiB")
    assert response.status_code == 202, response.text
    assert growth <= MEMORY_BUDGET, f"+{growth / 1024**2:.0f} MiB"
