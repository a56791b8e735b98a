"""A job's timings add up: adapting plus segmenting is the run's wall time, segmenting is the sum of its
scans' seconds, and a job without adaptation never reports the adapting phase."""

from __future__ import annotations

import time
from datetime import datetime

import pytest


def _follow(stack, job_id: str, timeout: float = 240) -> tuple[dict, set[str]]:
    """Poll the job until it ends; the final record and every phase seen on the way."""
    phases: set[str] = set()
    deadline = time.monotonic() + timeout
    with stack.client() as http:
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["phase"]:
                phases.add(job["phase"])
            if job["state"] not in ("queued", "running"):
                return job, phases
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end: {job}\n{stack.logs()}")


def _run_seconds(job: dict) -> float:
    started, finished = (datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
    return (finished - started).total_seconds()


@pytest.mark.parametrize(("adaptation", "steps"), [("none", None), ("tent", 5)])
def test_timings_add_up_to_the_run(stack, scan_dir, adaptation, steps):
    fields = {"model": "phantom", "adaptation": adaptation} | ({"steps": steps} if steps else {})
    response = stack.submit(sorted(scan_dir.glob("*.nii.gz"))[:3], **fields)
    assert response.status_code == 202, response.text
    job, phases = _follow(stack, response.json()["id"])
    assert job["state"] == "succeeded", job
    timings = job["timings"]
    adapt, segment = timings["adapt_seconds"], timings["segment_seconds"]
    per_scan = sum(s["seconds"] for s in job["scans"])
    run = _run_seconds(job)
    print(f"{adaptation}: adapt {adapt}s segment {segment}s scans {per_scan:.3f}s run {run:.3f}s {phases}")
    assert abs(adapt + segment - run) < 1.0
    assert abs(segment - per_scan) < 1.0 and segment > 0.5 * per_scan
    if adaptation == "none":
        assert adapt == 0.0 and "adapting" not in phases
    else:
        assert adapt > 0.0
