"""In-process checks of the service's building blocks: upload grouping and zip safety, keys, storage,
migrations, worker claiming, bounded retries, recovery of lost jobs, and the project's import structure."""

from __future__ import annotations

import ast
import os
import shutil
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from scan_files import zip_of

from service.auth import KeyRing, hash_token, load_keys
from service.celery_app import make_celery
from service.config import Settings
from service.db import Base, Database, IncomingStudy, Job, Worker, migrate, utcnow
from service.jobs import recover
from service.routing import site_domain
from service.states import JobState
from service.storage import LocalStorage
from service.uploads import ApiError, UploadedFile, assemble_scans, safe_name, sniff
from workers import autostart, pushback, runner
from workers import context as worker_context


def _upload(path: Path) -> UploadedFile:
    return UploadedFile(path.name, path, path.stat().st_size, "0" * 64)


def test_zip_folders_become_scans_and_names_are_safe(tmp_path, scan_dir):
    dicom_like = b"\0" * 128 + b"DICM" + b"\0" * 64
    archive = zip_of(
        tmp_path / "study.zip",
        {
            "a/1.dcm": dicom_like,
            "a/2.dcm": dicom_like,
            "b/1.dcm": dicom_like,
            "__MACOSX/a/._1.dcm": b"x",
            "DICOMDIR": dicom_like,
            "notes.txt": b"hello",
            "img.nii.gz": (scan_dir / "case00.nii.gz").read_bytes(),
        },
    )
    scans = assemble_scans([_upload(archive)], tmp_path / "staging", 10**9)
    assert [(s.name, s.kind, s.files) for s in scans] == [
        ("img", "nifti", 1),
        ("study_a", "dicom", 2),
        ("study_b", "dicom", 1),
    ]
    assert safe_name("../../x y.nii.gz") == "x_y" and safe_name("...") == "scan"
    assert sniff(scan_dir / "case00.nii.gz", "case00.nii.gz") == "nifti"


@pytest.mark.parametrize(
    ("members", "status", "reason"),
    [
        ({"../x.dcm": b"x"}, 422, "unsafe"),
        ({"C:/x.dcm": b"x"}, 422, "unsafe"),
        ({"big.bin": b"\0" * 5000}, 413, "allowed size"),
    ],
)
def test_unsafe_zips_are_refused(tmp_path, members, status, reason):
    archive = zip_of(tmp_path / "bad.zip", members)
    with pytest.raises(ApiError) as err:
        assemble_scans([_upload(archive)], tmp_path / "staging", 4000)
    assert err.value.status_code == status and reason in err.value.detail


def test_zip_symlinks_are_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("series/evil.dcm")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(ApiError, match="symbolic link"):
        assemble_scans([_upload(path)], tmp_path / "staging", 10**6)


def test_keys_are_hashed_and_parsed(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# comment\nbob {hash_token('b-token')}\n")
    settings = Settings(api_keys=f"alice:{hash_token('a-token')}", api_keys_file=keys_file)
    ring = KeyRing(load_keys(settings))
    assert ring.authenticate("a-token").id == "alice" and ring.authenticate("b-token").id == "bob"
    assert ring.authenticate("nope") is None
    with pytest.raises(ValueError, match="sha256"):
        load_keys(Settings(api_keys="alice:not-a-hash"))


def test_storage_refuses_escaping_keys(tmp_path):
    storage = LocalStorage(tmp_path)
    assert storage.put("a/b.txt", b"hi") == hash_token("hi")
    assert storage.get("a/b.txt") == b"hi" and storage.exists("a")
    for key in ("../x", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(ValueError):
            storage.put(key, b"x")
    storage.delete("a")
    assert not storage.exists("a/b.txt")
    storage.probe()


def test_sqlite_migrations_match_models(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    db = Database(f"sqlite:///{tmp_path}/t.db")
    migrate(db.engine)
    migrate(db.engine)
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    """A worker context on a temporary SQLite database, storage and filesystem broker."""
    settings = Settings(data_dir=tmp_path, max_attempts=3, stale_after=5, broker_url="filesystem://")
    db = Database(settings.resolved_database_url)
    migrate(db.engine)
    context = worker_context.Context(
        settings, db, LocalStorage(settings.resolved_storage_dir), make_celery(settings), "host:1:test"
    )
    monkeypatch.setattr(runner, "get_context", lambda: context)
    return context


def _job(ctx, **values) -> str:
    fields = dict(
        id="j" * 32,
        client_id="c",
        model_ref="m",
        bundle_name="m",
        bundle_version="1",
        labels={},
        adaptation="none",
        queue="cpu",
        attempts=0,
        progress=0.0,
        source="upload",
    )
    job = Job(**{**fields, **values})
    with ctx.db.session() as session:
        session.add(job)
        session.commit()
    return job.id


def _get(ctx, job_id: str) -> Job:
    with ctx.db.session() as session:
        return session.get(Job, job_id)


def _messages(ctx) -> int:
    return len(list((ctx.settings.resolved_broker_dir / "queue").iterdir()))


def test_unexpected_errors_are_retried_then_fail(ctx, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runner, "_execute", crash)
    job_id = _job(ctx, state="queued")
    for attempt in (1, 2):
        runner.run(job_id)
        job = _get(ctx, job_id)
        assert (job.state, job.attempts) == ("queued", attempt) and "disk on fire" in job.error
    assert _messages(ctx) == 2
    runner.run(job_id)
    job = _get(ctx, job_id)
    assert job.state == "failed" and "after 3 attempts" in job.error


def test_job_whose_worker_keeps_dying_fails(ctx):
    job_id = _job(ctx, state="queued", attempts=3)
    runner.run(job_id)
    job = _get(ctx, job_id)
    assert job.state == "failed" and "worker was lost" in job.error


def test_claim_is_exclusive(ctx):
    job_id = _job(ctx, state="queued")
    assert runner.claim(ctx, job_id, "t1") and not runner.claim(ctx, job_id, "t2")
    with ctx.db.session() as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)
        session.commit()
    assert runner.claim(ctx, job_id, "t3")  # the first holder stopped heart-beating
    assert _get(ctx, job_id).run_token == "t3"


def test_recovery_requeues_lost_jobs(ctx):
    stale = utcnow() - timedelta(seconds=60)
    lost = _job(ctx, id="a" * 32, state="running", heartbeat_at=stale, run_token="x")
    alive = _job(ctx, id="b" * 32, state="running", heartbeat_at=utcnow(), run_token="y")
    unsent = _job(ctx, id="c" * 32, state="queued", created_at=stale)
    done = _job(ctx, id="d" * 32, state="succeeded", created_at=stale)
    resent = recover(ctx.db, ctx.celery, ctx.settings)
    assert sorted(resent) == sorted([lost, unsent])
    assert _get(ctx, lost).state == "queued" and _get(ctx, alive).state == "running"
    assert _get(ctx, done).state == "succeeded" and _messages(ctx) == 2
    assert recover(ctx.db, ctx.celery, ctx.settings) == []


def test_job_of_a_dead_worker_is_requeued_before_stale_after(ctx):
    settings = ctx.settings.model_copy(update={"stale_after": 3600.0, "heartbeat_interval": 1.0})
    quiet = utcnow() - timedelta(seconds=30)
    with ctx.db.session() as session:
        session.add(Worker(hostname="live", queues="cpu", device="cpu", pid=1, last_seen=utcnow()))
        session.add(Worker(hostname="dead", queues="cpu", device="cpu", pid=2, last_seen=quiet))
        session.commit()
    orphan = _job(ctx, id="a" * 32, state="running", heartbeat_at=quiet, run_token="x", worker="dead")
    busy = _job(ctx, id="b" * 32, state="running", heartbeat_at=quiet, run_token="y", worker="live")
    assert recover(ctx.db, ctx.celery, settings) == [orphan]
    assert _get(ctx, orphan).state == JobState.QUEUED and _get(ctx, busy).state == JobState.RUNNING


PACKAGES = ("models", "trainer", "cli", "service", "workers")


def _import_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports (at any level of the file), from the source's AST."""
    root = Path(__file__).resolve().parents[1]
    files = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for package in PACKAGES
        for path in (root / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                imported.add(base)
                imported.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {m for m in imported if m in files and m != module}
    return graph


def test_failed_push_keeps_the_job_succeeded_and_is_retried(ctx, monkeypatch):
    def unreachable(paths, client):
        raise pushback.dicomweb.DicomWebError("the PACS at x cannot be reached", 503)

    monkeypatch.setattr(pushback.dicomweb, "push_instances", unreachable)
    monkeypatch.setattr(pushback, "PUSH_BACKOFF_S", 0.0)
    ctx.settings.dicomweb_url = "http://pacs.invalid/dicom-web"
    upload = _job(ctx, id="u" * 32, state="succeeded")
    job_id = _job(ctx, state="succeeded", source="dicomweb", study_uid="1.2.3")
    assert pushback.push_job(ctx, upload) == "none" and _get(ctx, upload).push_state == "none"
    assert pushback.push_job(ctx, job_id) == "push_failed"
    job = _get(ctx, job_id)
    assert (job.state, job.push_state, job.push_attempts) == ("succeeded", "push_failed", 1)
    assert "cannot be reached" in job.push_error and job.pushed_at is None
    assert pushback.retry_pushes(ctx) == []  # not before push_retry_interval
    with ctx.db.session() as session:
        session.get(Job, job_id).updated_at = utcnow() - timedelta(
            seconds=ctx.settings.push_retry_interval + 1
        )
        session.commit()
    assert pushback.retry_pushes(ctx) == [job_id] and _get(ctx, job_id).push_state == "pending"
    assert pushback.retry_pushes(ctx) == [] and _messages(ctx) == 1

    monkeypatch.setattr(pushback.dicomweb, "push_instances", lambda paths, client: None)
    assert pushback.push_job(ctx, job_id) == "pushed"
    job = _get(ctx, job_id)
    assert (job.push_state, job.push_error, job.push_attempts) == ("pushed", None, 2) and job.pushed_at


def test_push_retries_transient_errors_only(monkeypatch):
    answers = [pushback.dicomweb.DicomWebError("HTTP 500", 502, 500), None]
    calls = []

    def store(paths, client):
        calls.append(paths)
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    monkeypatch.setattr(pushback.dicomweb, "push_instances", store)
    monkeypatch.setattr(pushback, "PUSH_BACKOFF_S", 0.0)
    pushback.push([], None)
    assert len(calls) == 2
    answers[:] = [pushback.dicomweb.DicomWebError("HTTP 400", 502, 400)]
    with pytest.raises(pushback.dicomweb.DicomWebError, match="400"):
        pushback.push([], None)
    assert len(calls) == 3


def test_object_uids_are_fixed_per_job_scan_and_kind():
    assert pushback.object_uids("a", "series1", "seg") == pushback.object_uids("a", "series1", "seg")
    uids = {
        pushback.object_uids(j, s, k) for j in "ab" for s in ("series1", "series2") for k in ("seg", "sr")
    }
    assert len({uid for pair in uids for uid in pair}) == 16


def _push_study(ctx, client: str, series_dir: Path, age: float) -> str:
    """Copy two instances of a real series into ``client``'s incoming folder, last changed ``age`` s ago."""
    files = sorted(series_dir.glob("*.dcm"))[:2]
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    study = ctx.settings.resolved_storage_dir / "incoming" / client / str(header.StudyInstanceUID)
    target = study / str(header.SeriesInstanceUID)
    target.mkdir(parents=True)
    for f in files:
        shutil.copy(f, target / f.name)
    for folder in (target, study):
        os.utime(folder, (time.time() - age,) * 2)
    return str(header.StudyInstanceUID)


def test_quiet_studies_start_once_with_their_route(ctx, data_root, tmp_path):
    series_dir = data_root / "dicom/prostate3t_t2/Prostate3T-03-0001"
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- client: alice\n  match: {Modality: MR, SeriesDescription: '(?i)t2'}\n"
        "  model: cardiac-bssfp\n  adaptation: none\n"
    )
    ctx.settings.routing_rules, ctx.settings.study_quiet_seconds = rules, 30
    study = _push_study(ctx, "alice", series_dir, age=5)
    assert autostart.start_quiet_studies(ctx) == []  # not quiet yet
    ctx.settings.study_quiet_seconds = 2
    [job_id] = autostart.start_quiet_studies(ctx)
    assert autostart.start_quiet_studies(ctx) == []  # claimed once
    job = _get(ctx, job_id)
    header = pydicom.dcmread(sorted(series_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    assert (job.client_id, job.study_uid, job.source, job.state) == ("alice", study, "dicomweb", "queued")
    assert (job.bundle_name, job.adaptation, job.domain) == ("cardiac-bssfp", "none", site_domain(header))
    assert job.domain.startswith("siemens-") and _messages(ctx) == 1

    _push_study(ctx, "bob", series_dir, age=5)  # no rule for bob's studies
    assert autostart.start_quiet_studies(ctx) == []
    with ctx.db.session() as session:
        row = session.query(IncomingStudy).filter_by(client_id="bob").one()
    assert (row.state, row.job_id) == ("unrouted", None) and "no routing rule" in row.reason


def test_no_import_cycles_and_service_does_not_import_workers():
    graph = _import_graph()
    assert {"service.jobs", "workers.runner", "models.pipeline"} <= graph.keys()
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith("service")
        for d in deps
        if d.startswith("workers")
    )
    assert not upward, upward
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_input_and_bundle_errors_map_to_422(tmp_path):
    from fastapi.testclient import TestClient

    from models.bundle import BundleError
    from models.io import InputError
    from service.app import create_app

    app = create_app(Settings(data_dir=tmp_path, broker_url="filesystem://"))

    @app.get("/boom/{kind}")
    def boom(kind: str) -> None:
        raise {
            "input": InputError("scan is 2D"),
            "bundle": BundleError("bundle corrupt"),
            "bug": ValueError("x"),
        }[kind]

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/boom/input").json() == {"detail": "scan is 2D"}
        assert client.get("/boom/bundle").status_code == 422
        assert client.get("/boom/bug").status_code == 500  # a genuine bug is not disguised as bad input


def test_jobs_of_pacs_studies_link_to_the_pacs_viewer():
    from service.views import job_out

    template = "http://pacs.example/viewer?StudyInstanceUID={study_uid}"
    fields = dict(
        client_id="alice", state="succeeded", progress=100.0, model_ref="m", bundle_name="m", bundle_version="1",
        labels={}, adaptation="none", queue="cpu", attempts=1, created_at=utcnow(),
    )  # fmt: skip
    study = Job(id="a" * 32, source="dicomweb", study_uid="1.2.3", **fields)
    upload = Job(id="b" * 32, source="upload", **fields)
    assert job_out(study, pacs_viewer_url=template).pacs_viewer == template.replace("{study_uid}", "1.2.3")
    assert job_out(study).pacs_viewer is None
    assert job_out(upload, pacs_viewer_url=template).pacs_viewer is None


@pytest.mark.parametrize(
    "institution",
    [
        "../../etc/passwd",
        "/abs/path",
        "x" * 5000,
        "\\\\server\\share",
        "Ünïcødé ☢",
        "",
        "-_-",
        "a/../../b\x00c",
    ],
)
def test_site_domain_from_hostile_headers_is_a_safe_domain_key(institution):
    import re

    import pydicom

    from service.schemas import DOMAIN_PATTERN

    header = pydicom.Dataset()
    header.InstitutionName = institution
    header.Manufacturer = "ACME/../"
    domain = site_domain(header)
    assert re.fullmatch(DOMAIN_PATTERN, domain) and "/" not in domain and ".." not in domain, domain
