"""Real processes on loopback: a uvicorn API and Celery workers, Redis as broker, SQLite and local storage.

Fast tests use an untrained bundle of the phantom architecture, saved with the ML core's ``save_bundle``
(seconds, where training the core's ``tiny_bundle`` takes minutes on a shared 2-core machine): the service's
behaviour, not segmentation quality, is under test there. Quality is checked with the committed bundles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 11
TOKENS = {"alice": "tok-alice-" + "a" * 24, "bob": "tok-bob-" + "b" * 24}
TERMINAL = ("succeeded", "failed", "cancelled")


def api_keys_setting() -> str:
    """TTASEG_API_KEYS value for the test clients."""
    return ",".join(f"{c}:{hashlib.sha256(t.encode()).hexdigest()}" for c, t in TOKENS.items())


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> str:
    """A Redis on 127.0.0.1:6379 (started when absent); returns the URL of the tests' database."""
    if not _redis_up():
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--port",
                str(REDIS_PORT),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=True,
        )
        for _ in range(50):
            if _redis_up():
                break
            time.sleep(0.1)
        else:
            pytest.skip("could not start redis-server")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory) -> Path:
    """Bundle folder for the service: an untrained phantom bundle plus the repository's committed bundles."""
    from models.phantom import save_untrained_bundle

    root = tmp_path_factory.mktemp("service-bundles")
    save_untrained_bundle(root / "phantom")
    for card in sorted((REPO / "bundles").glob("*/model_card.json")):
        shutil.copytree(card.parent, root / card.parent.name)
    return root


@pytest.fixture(scope="session")
def scan_dir(tmp_path_factory) -> Path:
    """Small phantom scans to upload (not the ones the tiny bundle was trained on)."""
    from models.phantom import write_phantoms

    folder = tmp_path_factory.mktemp("scans")
    write_phantoms(folder, 4, seed=100)
    return folder / "images"


class Stack:
    """API and worker subprocesses sharing one data folder, database and broker."""

    def __init__(self, root: Path, bundles: Path, broker_url: str, **settings: Any) -> None:
        self.root = root
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TTASEG_DATA_DIR": str(root / "data"),
            "TTASEG_BUNDLES": str(bundles),
            "TTASEG_BROKER_URL": broker_url,
            "TTASEG_REDIS_KEY_PREFIX": f"ttaseg-test-{uuid.uuid4().hex[:8]}:",
            "TTASEG_API_KEYS": ",".join(
                f"{c}:{hashlib.sha256(t.encode()).hexdigest()}" for c, t in TOKENS.items()
            ),
            "TTASEG_DEVICE": "cpu",
            "TTASEG_JOB_QUEUE": "cpu",
            "TTASEG_HEARTBEAT_INTERVAL": "1",
            "TTASEG_STALE_AFTER": "8",
            "TTASEG_RECOVERY_INTERVAL": "2",
            "TTASEG_VISIBILITY_TIMEOUT": "60",
            "TTASEG_BROKER_POLL_INTERVAL": "0.2",
            "TTASEG_MAX_UPLOAD_BYTES": str(64 * 1024**2),
            "TTASEG_MAX_SCANS_PER_JOB": "4",
            "TTASEG_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.update({f"TTASEG_{k.upper()}": str(v) for k, v in settings.items()})
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._logs: list[Path] = []

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}-{len(self._logs)}.log"
        self._logs.append(log)
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_api(self) -> None:
        """Start the API and wait until it answers."""
        self.api = self._spawn("api", ["-m", "service", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.api.poll() is None, f"API exited:\n{self.logs()}"
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"API did not start:\n{self.logs()}")

    def stop_api(self, sig: int = signal.SIGTERM) -> None:
        """Stop the API process group with ``sig``."""
        assert self.api is not None
        _signal_group(self.api, sig)
        self.api.wait(timeout=30)
        self.api = None

    def start_worker(self, wait: bool = True) -> subprocess.Popen:
        """Start a worker; with ``wait``, until readiness reports a live worker."""
        proc = self._spawn("worker", ["-m", "workers"])
        self.workers.append(proc)
        if wait:
            self.wait_ready()
        return proc

    def kill_worker(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal a worker's whole process group and reap it."""
        _signal_group(proc, sig)
        proc.wait(timeout=60)
        self.workers.remove(proc)

    def wait_ready(self, timeout: float = 90) -> None:
        """Until /readyz passes (database, storage, broker, live worker)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.workers:
                assert proc.poll() is None, f"worker exited:\n{self.logs()}"
            if httpx.get(f"{self.base_url}/readyz", timeout=10).status_code == 200:
                return
            time.sleep(0.3)
        raise AssertionError(f"service not ready:\n{self.logs()}")

    def client(self, user: str = "alice", **kwargs: Any) -> httpx.Client:
        """HTTP client authenticated as ``user`` (None: no credentials)."""
        headers = {"Authorization": f"Bearer {TOKENS[user]}"} if user else {}
        headers.update(kwargs.pop("headers", {}))
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)

    def submit(self, files: list[Path], user: str = "alice", **fields: Any) -> httpx.Response:
        """POST /v1/jobs with the given files and form fields."""
        with self.client(user) as http:
            handles = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in files]
            return http.post("/v1/jobs", data={k: str(v) for k, v in fields.items()}, files=handles)

    def wait_job(self, job_id: str, user: str = "alice", timeout: float = 180, until=TERMINAL) -> dict:
        """Poll a job until its state is in ``until``."""
        deadline = time.monotonic() + timeout
        with self.client(user) as http:
            while time.monotonic() < deadline:
                try:
                    body = http.get(f"/v1/jobs/{job_id}").json()
                except httpx.HTTPError:  # API being restarted
                    time.sleep(0.3)
                    continue
                if body.get("state") in until:
                    return body
                time.sleep(0.3)
        raise AssertionError(f"job {job_id} not in {until} after {timeout}s: {body}\n{self.logs()}")

    def logs(self, tail: int = 60) -> str:
        """Last lines of every process log."""
        out = []
        for log in self._logs:
            lines = log.read_text(errors="replace").splitlines()[-tail:] if log.exists() else []
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def close(self) -> None:
        """Stop every process."""
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        self.workers, self.api = [], None
        if self.env["TTASEG_BROKER_URL"].startswith("redis://"):
            import redis

            client = redis.Redis.from_url(self.env["TTASEG_BROKER_URL"])
            for key in client.scan_iter(match=self.env["TTASEG_REDIS_KEY_PREFIX"] + "*"):
                client.delete(key)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture
def make_stack(tmp_path_factory, bundle_root, redis_server) -> Iterator[Any]:
    """Factory of private stacks (for tests that kill or restart processes)."""
    stacks: list[Stack] = []

    def make(broker_url: str | None = None, **settings: Any) -> Stack:
        stack = Stack(tmp_path_factory.mktemp("stack"), bundle_root, broker_url or redis_server, **settings)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, bundle_root, redis_server) -> Iterator[Stack]:
    """The shared stack: API plus one worker, both running for the whole session."""
    shared = Stack(
        tmp_path_factory.mktemp("shared-stack"), bundle_root, redis_server, max_voxels_per_scan=8_000_000
    )
    try:
        shared.start_api()
        shared.start_worker()
        yield shared
    finally:
        shared.close()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``../shared/data`` beside the repository (tests using it skip without it)."""
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    return DATA
