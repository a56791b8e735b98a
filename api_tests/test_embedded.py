"""`python -m service.embedded`: API and worker on one machine with no external servers (SQLite, local
storage, Celery filesystem transport); a worker that dies is restarted and its job re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
from conftest import REPO, free_port


def test_embedded_mode_runs_jobs_and_survives_worker_death(tmp_path, bundle_root, scan_dir):
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TTASEG_")},
        "TTASEG_DATA_DIR": str(tmp_path / "var"),
        "TTASEG_BUNDLES": str(bundle_root),
        "TTASEG_DEVICE": "cpu",
        "TTASEG_BROKER_POLL_INTERVAL": "0.2",
        "TTASEG_HEARTBEAT_INTERVAL": "1",
        "TTASEG_STALE_AFTER": "6",
        "TTASEG_RECOVERY_INTERVAL": "2",
        "OMP_NUM_THREADS": "1",
    }
    log = (tmp_path / "embedded.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.embedded", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        token_file = tmp_path / "var" / "local-token"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "embedded.log").read_text()
            try:
                if token_file.exists() and httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError((tmp_path / "embedded.log").read_text())
        assert (token_file.stat().st_mode & 0o777) == 0o600
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
            scans = sorted(scan_dir.glob("*.nii.gz"))[:2]
            files = [("files", (p.name, p.read_bytes())) for p in scans]
            job_id = http.post(
                "/v1/jobs", data={"model": "phantom", "adaptation": "none"}, files=files
            ).json()["id"]
            assert _wait(http, job_id)["state"] == "succeeded"

            job_id = http.post(
                "/v1/jobs", data={"model": "phantom", "adaptation": "mpl", "steps": "60"}, files=files
            ).json()["id"]
            _wait(http, job_id, until=("running",))
            workers = [p for p in psutil.Process(proc.pid).children() if "workers" in " ".join(p.cmdline())]
            assert len(workers) == 1
            workers[0].send_signal(signal.SIGKILL)
            job = _wait(http, job_id, timeout=240)
            assert job["state"] == "succeeded" and job["attempts"] == 2, job
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _wait(
    http: httpx.Client, job_id: str, timeout: float = 120, until=("succeeded", "failed", "cancelled")
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in until:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id}: {job}")
