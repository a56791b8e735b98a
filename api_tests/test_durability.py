"""A 202'd job is never lost: worker SIGKILL mid-job, API restarts, lost broker messages."""

from __future__ import annotations

import signal
import time

import httpx
import pytest


def _wait_running(stack, job_id: str, timeout: float = 120) -> dict:
    """Until the job is adapting (past its first progress report)."""
    deadline = time.monotonic() + timeout
    with stack.client() as http:
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["state"] == "running" and job["phase"] == "adapting":
                return job
            assert job["state"] in ("queued", "running"), job
            time.sleep(0.2)
    raise AssertionError(f"job {job_id} never ran\n{stack.logs()}")


@pytest.mark.parametrize("broker", ["redis", "filesystem"])
def test_worker_killed_mid_job_is_rerun(make_stack, scan_dir, broker):
    stack = make_stack(broker_url="filesystem://" if broker == "filesystem" else None)
    stack.start_api()
    worker = stack.start_worker()
    scans = sorted(scan_dir.glob("*.nii.gz"))[:2]
    job_id = stack.submit(scans, model="phantom", adaptation="mpl", steps=60).json()["id"]
    _wait_running(stack, job_id)
    stack.kill_worker(worker, signal.SIGKILL)
    with stack.client() as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] in ("running", "queued")
    stack.start_worker(wait=False)
    job = stack.wait_job(job_id, timeout=240)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    assert [s["state"] for s in job["scans"]] == ["succeeded", "succeeded"]
    results = sorted(
        p.name for p in (stack.root / "data" / "storage" / "jobs" / job_id / "results").iterdir()
    )
    # one run's outputs per scan (label map, record, source model's label map, uncertainty): nothing doubled
    assert results == [
        f"{case}{suffix}"
        for case in ("case00", "case01")
        for suffix in (".json", ".nii.gz", "_source.nii.gz", "_uncertainty.nii.gz")
    ]


def test_api_restart_during_job(make_stack, scan_dir):
    stack = make_stack()
    stack.start_api()
    stack.start_worker()
    scans = sorted(scan_dir.glob("*.nii.gz"))[:2]
    job_id = stack.submit(scans, model="phantom", adaptation="mpl", steps=60).json()["id"]
    _wait_running(stack, job_id)
    stack.stop_api(signal.SIGKILL)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{stack.base_url}/healthz", timeout=2)
    stack.start_api()
    with stack.client() as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] in ("running", "succeeded")
    job = stack.wait_job(job_id, timeout=180)
    assert job["state"] == "succeeded" and job["attempts"] == 1


def test_job_accepted_while_no_worker_runs_later(make_stack, scan_dir):
    stack = make_stack()
    stack.start_api()
    scan = sorted(scan_dir.glob("*.nii.gz"))[0]
    job_id = stack.submit([scan], model="phantom", adaptation="none").json()["id"]
    with stack.client() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "worker" in ready.json()["checks"]["worker"]
        assert ready.json()["checks"]["queue"] == "failed: 1 job waiting on queue cpu with no live worker"
        assert ready.headers["retry-after"]
    stack.start_worker(wait=False)
    assert stack.wait_job(job_id, timeout=120)["state"] == "succeeded"


def test_queue_limit_answers_429_with_retry_after(make_stack, scan_dir):
    stack = make_stack(max_queued_jobs=2, retry_after_seconds=7)
    stack.start_api()
    scan = sorted(scan_dir.glob("*.nii.gz"))[0]
    codes = [stack.submit([scan], model="phantom", adaptation="none") for _ in range(3)]
    assert [r.status_code for r in codes] == [202, 202, 429]
    assert codes[2].headers["retry-after"] == "7" and codes[2].json()["detail"]
