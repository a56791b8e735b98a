"""The compose database: migrations and a job flow on a throw-away PostgreSQL cluster (skipped if absent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port


def _as_postgres(command: list[str]) -> list[str]:
    """Run as the `postgres` user when we are root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser")
    return [runuser, "-u", "postgres", "--", *command]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries are not installed")
    root = Path(tempfile.mkdtemp(prefix="ttaseg-pg-"))  # outside pytest's root-only temp folder
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres([initdb, "-D", str(data), "-A", "trust", "-U", "ttaseg"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {sockets} -h 127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "pg.log"), "-w", "start"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql+psycopg://ttaseg@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            timeout=60,
        )


def test_migrations_match_models_on_postgres(postgres_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.db import Base, Database, migrate

    db = Database(postgres_url)
    migrate(db.engine)
    migrate(db.engine)  # idempotent
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    db.engine.dispose()


def test_job_flow_on_postgres(postgres_url, make_stack, scan_dir):
    stack = make_stack(database_url=postgres_url)
    stack.start_api()
    stack.start_worker()
    response = stack.submit(
        sorted(scan_dir.glob("*.nii.gz"))[:1], model="phantom", adaptation="tent", steps=2, domain="pg-site"
    )
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"], timeout=120)
    assert job["state"] == "succeeded", job
    with stack.client() as http:
        assert http.get("/v1/jobs").json()["total"] == 1
        assert 'ttaseg_jobs{state="succeeded"} 1.0' in http.get("/metrics").text
    assert Path(stack.root / "data" / "ttaseg.db").exists() is False
