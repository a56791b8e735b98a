"""Test helpers for PACS integration: a throw-away Orthanc (with its DICOMweb plugin) and the service's API
as STOW-RS receiver, each as a real process on a free local port.

Orthanc comes from Debian: ``apt-get install -y orthanc orthanc-dicomweb``. Set ``ORTHANC_DICOMWEB_PLUGIN``
to use a plugin library outside the Debian locations.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
START_TIMEOUT_S = 30.0


def dicomweb_plugin() -> Path | None:
    """Path of Orthanc's DICOMweb plugin library, or None when it is not installed."""
    override = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if override:
        return Path(override) if Path(override).is_file() else None
    for pattern in PLUGIN_CANDIDATES:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    return None


def missing_orthanc() -> str | None:
    """Why Orthanc tests cannot run here, or None when they can."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server started as a child process, ready once ``probe_url`` answers; stopped on exit."""

    def __init__(
        self, command: Sequence[str], probe_url: str, log_path: Path, env: dict[str, str] | None = None
    ):
        self.command = list(command)
        self.probe_url = probe_url
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.log_path.parent
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(self.probe_url, timeout=1.0).status_code < 500:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"{self.command[0]} did not start; log:\n{self.log_path.read_text()[-3000:]}")

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Orthanc(ServerProcess):
    """Orthanc with DICOMweb on ``/dicom-web/``, local-only HTTP, no DICOM port, no authentication.

    ``dicomweb_servers`` maps names to the DICOMweb roots Orthanc pushes to (``/dicom-web/servers/<name>/stow``)
    and the bearer token it sends there; ``extra`` adds or overrides configuration options (e.g. ``LuaScripts``).
    """

    def __init__(
        self,
        workdir: Path,
        dicomweb_servers: dict[str, tuple[str, str]] | None = None,
        extra: dict[str, object] | None = None,
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = {
            "Name": "ttaseg-test",
            "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"),
            "HttpPort": port,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {
                    name: {"Url": url, "HttpHeaders": {"Authorization": f"Bearer {token}"}}
                    for name, (url, token) in (dicomweb_servers or {}).items()
                },
            },
        }
        config.update(extra or {})
        config_path = workdir / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        self.url = f"http://127.0.0.1:{port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        super().__init__(["Orthanc", str(config_path)], f"{self.url}/system", workdir / "orthanc.log")

    def upload(self, paths: Sequence[Path]) -> list[dict]:
        """Store DICOM files through the REST API (``POST /instances``); Orthanc's answers."""
        answers = []
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for path in paths:
                response = client.post("/instances", content=Path(path).read_bytes())
                response.raise_for_status()
                answers.append(response.json())
        return answers

    def get(self, path: str) -> object:
        """JSON answer of a REST GET."""
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, payload: object, timeout: float = 60) -> object:
        """JSON answer of a REST POST with a JSON body."""
        response = httpx.post(f"{self.url}{path}", json=payload, timeout=timeout)
        response.raise_for_status()
        return response.json()


class Receiver(ServerProcess):
    """The service's API (``python -m service``, no worker) with its own data folder and the given API keys."""

    def __init__(self, workdir: Path, api_keys: str, port: int | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage_dir = workdir / "storage"
        python_path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            "TTASEG_DATA_DIR": str(workdir / "data"),
            "TTASEG_STORAGE_DIR": str(self.storage_dir),
            "TTASEG_API_KEYS": api_keys,
            "PYTHONPATH": python_path,
        }
        command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(command, f"{self.url}/healthz", workdir / "receiver.log", env=env)
