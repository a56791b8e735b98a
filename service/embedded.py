"""One-machine deployment: ``python -m service.embedded`` runs the API and a worker with no external servers.

SQLite, local storage and Celery's filesystem transport under TTASEG_DATA_DIR (default ./var). When no API key
is configured, a token for client ``local`` is created and written to ``<data_dir>/local-token``.
A worker that exits unexpectedly is restarted; its unfinished job is re-run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.auth import hash_token, new_token
from service.config import get_settings


def _local_key(data_dir: Path) -> Path:
    """Create (once) a token for client ``local``; returns the keys file holding its hash."""
    data_dir.mkdir(parents=True, exist_ok=True)
    token_file, keys_file = data_dir / "local-token", data_dir / "api-keys"
    if not token_file.exists():
        token = new_token()
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        keys_file.write_text(f"local {hash_token(token)}\n")
        print(f"created API token for client 'local' in {token_file}", flush=True)
    return keys_file


def main(argv: list[str] | None = None) -> None:
    """Start and supervise the API and one worker until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m service.embedded", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    settings = get_settings()
    env = dict(os.environ)
    env.setdefault("TTASEG_DATA_DIR", str(settings.data_dir.resolve()))
    env.setdefault("TTASEG_BROKER_URL", "filesystem://")
    env.setdefault("TTASEG_WORKER_QUEUES", settings.job_queue)
    if not settings.api_keys and settings.api_keys_file is None:
        env["TTASEG_API_KEYS_FILE"] = str(_local_key(settings.data_dir.resolve()))
    api_cmd = [sys.executable, "-m", "service", "--host", args.host, "--port", str(args.port)]
    worker_cmd = [sys.executable, "-m", "workers"]
    procs = {"api": subprocess.Popen(api_cmd, env=env), "worker": subprocess.Popen(worker_cmd, env=env)}
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    restarts = 0
    while not stopping:
        time.sleep(0.5)
        if procs["api"].poll() is not None:
            print("API exited; stopping", flush=True)
            break
        if procs["worker"].poll() is not None:
            restarts += 1
            delay = min(30, 2**restarts)
            print(f"worker exited ({procs['worker'].returncode}); restarting in {delay}s", flush=True)
            time.sleep(delay)
            procs["worker"] = subprocess.Popen(worker_cmd, env=env)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
