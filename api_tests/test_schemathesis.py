"""Property-based run of schemathesis against the service's own OpenAPI document: no 5xx anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOKENS


def test_openapi_fuzzing_finds_no_server_errors(stack, tmp_path):
    binary = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(binary).exists():
        pytest.skip("schemathesis is not installed")
    command = [
        binary,
        "run",
        f"{stack.base_url}/openapi.json",
        "--checks=not_a_server_error",
        "--max-examples=8",
        "--max-time=60",
        "--workers=1",
        "--seed=1",
        "--request-timeout=30",
        "--phases=examples,coverage,fuzzing",
        "--generation-deterministic",
        "--no-color",
        f"--header=Authorization: Bearer {TOKENS['alice']}",
        f"--report-dir={tmp_path}",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"{output}\n{stack.logs(30)}"
