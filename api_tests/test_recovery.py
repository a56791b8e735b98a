"""Recovery with the default heartbeat and recovery settings: a SIGKILLed worker's job and a job whose broker
message died with a Redis restarted without persistence both run again within a minute."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import free_port

DEFAULTED = ("HEARTBEAT_INTERVAL", "STALE_AFTER", "RECOVERY_INTERVAL", "VISIBILITY_TIMEOUT")


def _with_defaults(stack):
    """The stack with the shipped heartbeat, stale, recovery and visibility settings."""
    for name in DEFAULTED:
        stack.env.pop(f"TTASEG_{name}")
    return stack


def _job(stack, job_id: str) -> dict:
    with stack.client() as http:
        return http.get(f"/v1/jobs/{job_id}").json()


def _wait(stack, job_id: str, done, timeout: float) -> tuple[dict, float]:
    """Poll until ``done(job)``; the job and the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            job = _job(stack, job_id)
        except httpx.HTTPError:
            job = {}
        if job and done(job):
            return job, time.monotonic() - start
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not done after {timeout}s: {job}\n{stack.logs()}")


class RedisProcess:
    """A private, non-persistent redis-server that a test may kill and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        import redis

        for _ in range(100):
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise AssertionError("private redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess()
    server.start()
    yield server
    if server.proc is not None:
        server.kill()


@pytest.mark.slow
def test_killed_workers_job_runs_again_within_a_minute(make_stack, scan_dir):
    stack = _with_defaults(make_stack())
    stack.start_api()
    worker = stack.start_worker()
    scan = sorted(scan_dir.glob("*.nii.gz"))[0]
    job_id = stack.submit([scan], model="phantom", adaptation="mpl", steps=20).json()["id"]
    _wait(stack, job_id, lambda j: j["state"] == "running" and j["phase"] == "adapting", 120)
    stack.kill_worker(worker, signal.SIGKILL)
    killed = time.monotonic()
    stack.start_worker(wait=False)
    rerun, _ = _wait(stack, job_id, lambda j: j["attempts"] == 2 and j["state"] != "queued", 90)
    rerun_after = time.monotonic() - killed
    job, _ = _wait(stack, job_id, lambda j: j["state"] in ("succeeded", "failed"), 120)
    print(f"re-run {rerun_after:.1f}s and done {time.monotonic() - killed:.1f}s after the kill")
    assert rerun_after < 60, rerun
    assert job["state"] == "succeeded" and job["attempts"] == 2, job


def test_queued_job_runs_after_redis_restart(private_redis, make_stack, scan_dir):
    stack = _with_defaults(make_stack(broker_url=private_redis.url))
    stack.start_api()
    stack.start_worker()
    scans = sorted(scan_dir.glob("*.nii.gz"))
    busy = stack.submit(scans[:1], model="phantom", adaptation="mpl", steps=15).json()["id"]
    _wait(stack, busy, lambda j: j["state"] == "running", 120)
    waiting = stack.submit(scans[1:2], model="phantom", adaptation="none").json()["id"]
    assert _job(stack, waiting)["state"] == "queued"
    private_redis.kill()
    private_redis.start()
    job, seconds = _wait(stack, waiting, lambda j: j["state"] in ("succeeded", "failed"), 90)
    print(f"queued job done {seconds:.1f}s after the broker came back")
    assert job["state"] == "succeeded" and seconds < 60, job
    assert _wait(stack, busy, lambda j: j["state"] == "succeeded", 120)[0]["attempts"] == 1
