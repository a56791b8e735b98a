"""Runs one job: claim it, adapt and segment its scans with the ML core, store results, update the record."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select, update

from models.bundle import BundleError, load_bundle, resolve_bundle
from models.checksums import series_sha256, sha256_file
from models.io import InputError, check_image
from models.terms import Method, Phase
from service import dicomweb
from service.db import DomainBundle, Job, Scan, utcnow
from service.jobs import domain_bundle, enqueue, update_running
from service.states import JobSource, JobState, PushState, ScanState
from workers.context import Context, get_context
from workers.pushback import push_job, wants_push

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The job was cancelled (or taken over) while running; stop without touching its record."""


class PermanentError(Exception):
    """A failure that a retry cannot fix; its message is the user-facing reason."""


@lru_cache(maxsize=8)
def _base_bundle(ref: str, root: str | None) -> Any:
    return resolve_bundle(ref, root=root)


@lru_cache(maxsize=32)
def _adapted_bundle(path: str) -> Any:
    return load_bundle(path)


def claim(ctx: Context, job_id: str, token: str) -> bool:
    """Atomically take a queued job (or a running one whose worker stopped heart-beating)."""
    now = utcnow()
    stale_at = now - timedelta(seconds=ctx.settings.stale_after)
    with ctx.db.session() as session:
        claimed = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                or_(
                    Job.state == JobState.QUEUED,
                    (Job.state == JobState.RUNNING)
                    & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_at),
                ),
            )
            .values(
                state=JobState.RUNNING,
                phase=None,
                progress=0.0,
                run_token=token,
                worker=ctx.name,
                heartbeat_at=now,
                started_at=now,
                attempts=Job.attempts + 1,
                error=None,
            )
        ).rowcount
        session.commit()
    return bool(claimed)


class _Heartbeat(threading.Thread):
    """Refreshes the job's heartbeat; notices when the job was cancelled or taken over."""

    def __init__(self, ctx: Context, job_id: str, token: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.ctx, self.job_id, self.token = ctx, job_id, token
        self.stop = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.ctx.settings.heartbeat_interval):
            try:
                alive = update_running(self.ctx.db, self.job_id, self.token, heartbeat_at=utcnow())
            except Exception as exc:  # database hiccup: try again next beat
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)
                continue
            if not alive:
                self.lost.set()
                return


class _Progress:
    """The progress callback handed to the ML core: records phase/percent and raises when cancelled.

    ``started`` holds the monotonic time at which each phase was first reported.
    """

    def __init__(self, ctx: Context, job_id: str, token: str, heartbeat: _Heartbeat) -> None:
        self.ctx, self.job_id, self.token, self.heartbeat = ctx, job_id, token, heartbeat
        self.started: dict[Phase, float] = {}
        self._last_write = 0.0
        self._phase: Phase | None = None

    def __call__(self, phase: str, percent: float) -> None:
        if self.heartbeat.lost.is_set():
            raise JobCancelled(self.job_id)
        phase = Phase(phase)
        percent = max(0.0, min(100.0, float(percent)))
        now = time.monotonic()
        self.started.setdefault(phase, now)
        if phase != self._phase or percent >= 100.0 or now - self._last_write >= 0.5:
            self._phase, self._last_write = phase, now
            written = update_running(
                self.ctx.db,
                self.job_id,
                self.token,
                phase=phase,
                progress=round(percent, 1),
                heartbeat_at=utcnow(),
            )
            if not written:
                raise JobCancelled(self.job_id)


def _fail(ctx: Context, job_id: str, token: str, reason: str) -> None:
    update_running(
        ctx.db, job_id, token, state=JobState.FAILED, phase=None, error=reason[:2000], finished_at=utcnow()
    )


def _retry_or_fail(ctx: Context, job: Job, token: str, exc: BaseException) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    if job.attempts >= ctx.settings.max_attempts:
        _fail(ctx, job.id, token, f"internal error after {job.attempts} attempts: {reason}")
        return
    moved = update_running(
        ctx.db,
        job.id,
        token,
        state=JobState.QUEUED,
        phase=None,
        progress=0.0,
        run_token=None,
        error=f"retrying after: {reason}",
    )
    if moved:
        enqueue(ctx.db, ctx.celery, job.id, job.queue, countdown=min(60.0, 5.0 * job.attempts))


def _study_series(ctx: Context, job: Job, dest: Path) -> list[Path]:
    """Image series folders of the job's study: pushed earlier by its client (STOW-RS; SEG, SR and other
    non-image series skipped), else pulled from the PACS."""
    received = dicomweb.image_series(
        dicomweb.incoming_study_series(ctx.settings.resolved_storage_dir, job.client_id, job.study_uid)
    )
    if received:
        return received
    try:
        return dicomweb.fetch_study(job.study_uid, dest, dicomweb.pacs_client(ctx.settings))
    except dicomweb.DicomWebError as exc:
        if exc.status_code in (404, 422):
            raise PermanentError(str(exc)) from None
        raise


def _fetch_study(ctx: Context, job: Job, dest: Path, progress: _Progress) -> None:
    """Record the job's study series as scans (replacing any earlier attempt's), checked as uploads are."""
    progress(Phase.FETCHING, 0.0)
    paths = _study_series(ctx, job, dest)
    scans: list[Scan] = []
    for position, path in enumerate(paths):
        try:
            header = check_image(path, max_voxels=ctx.settings.max_voxels_per_scan)
        except InputError as exc:
            raise PermanentError(f"series {path.name}: {exc}") from None
        name = f"series{position + 1}"
        key = f"jobs/{job.id}/inputs/{name}"
        ctx.storage.put_path(key, path)
        files = sorted(f for f in path.rglob("*") if f.is_file())
        scans.append(
            Scan(
                job_id=job.id,
                position=position,
                name=name,
                kind="dicom",
                input_key=key,
                input_bytes=sum(f.stat().st_size for f in files),
                sha256=series_sha256(sha256_file(f) for f in files),
                files=len(files),
                size=list(header.size),
                spacing=[float(s) for s in header.spacing],
                state=ScanState.PENDING,
                fallback=False,
            )
        )
    with ctx.db.session() as session:
        session.execute(delete(Scan).where(Scan.job_id == job.id))
        session.add_all(scans)
        session.commit()
    progress(Phase.FETCHING, 100.0)


def _choose_bundle(ctx: Context, job: Job) -> tuple[Any, Method, str, str | None]:
    """The bundle to run, the method to run it with, its description, and the job it was adapted by."""
    root = str(ctx.settings.bundles) if ctx.settings.bundles else None
    ref = f"{job.bundle_name}:{job.bundle_version}"
    base = _base_bundle(ref, root)
    method = Method(job.adaptation)
    if job.domain and method.adapts and ctx.settings.domain_policy == "reuse":
        with ctx.db.session() as session:
            cached = domain_bundle(session, job)
        if cached is not None and cached.job_id != job.id and ctx.storage.exists(cached.storage_key):
            bundle = _adapted_bundle(str(ctx.storage.local_path(cached.storage_key)))
            return bundle, Method.NONE, f"{ref} adapted ({method}) for domain {job.domain}", cached.job_id
    if not method.adapts:
        return base, Method.NONE, ref, None
    return base, method, f"{ref} adapted ({method}) on this job", None


def _remember_adapted(ctx: Context, job: Job, adapted: Path) -> str:
    """Store an adapted bundle and make it the domain's cached bundle."""
    parts = (job.client_id, job.bundle_name, job.bundle_version, job.adaptation, job.domain, job.id)
    key = "adapted/" + "/".join(str(p) for p in parts)
    ctx.storage.put_path(key, adapted)
    with ctx.db.session() as session:
        row = domain_bundle(session, job)
        if row is None:
            row = DomainBundle(
                client_id=job.client_id,
                bundle_name=job.bundle_name,
                bundle_version=job.bundle_version,
                adaptation=job.adaptation,
                domain=job.domain,
            )
            session.add(row)
        row.storage_key, row.job_id, row.created_at = key, job.id, utcnow()
        session.commit()
    return key


def _execute(ctx: Context, job: Job, token: str, progress: _Progress, scratch: Path) -> None:
    from models.pipeline import segment_batch

    if job.source == JobSource.DICOMWEB:
        _fetch_study(ctx, job, scratch / "fetched", progress)
    with ctx.db.session() as session:
        scans = list(session.scalars(select(Scan).where(Scan.job_id == job.id).order_by(Scan.position)))
    bundle, method, bundle_used, reused_from = _choose_bundle(ctx, job)
    save_adapted = scratch / "adapted" if job.domain and method.adapts else None
    out_dir = scratch / "out"
    device = ctx.settings.resolved_device
    started = time.monotonic()
    results = segment_batch(
        [ctx.storage.local_path(s.input_key) for s in scans],
        bundle,
        out_dir,
        method=method,
        steps=job.steps,
        device=device,
        progress=progress,
        case_names=[s.name for s in scans],
        save_adapted=save_adapted,
        uncertainty=True,
    )
    finished = time.monotonic()
    segment_from = progress.started.get(Phase.SEGMENTING, finished) if method.adapts else started
    adapted_key = None
    if save_adapted is not None and save_adapted.is_dir():
        adapted_key = _remember_adapted(ctx, job, save_adapted)
    results_key = f"jobs/{job.id}/results"
    ctx.storage.put_path(results_key, out_dir)
    by_case = {r.case: r for r in results}
    with ctx.db.session() as session:
        current = session.scalar(select(Job).where(Job.id == job.id).with_for_update())
        if current is None or current.run_token != token or current.state != JobState.RUNNING:
            raise JobCancelled(job.id)
        for scan in current.scans:
            result = by_case.get(scan.name)
            if result is None:
                scan.state = ScanState.FAILED
                continue
            scan.state = ScanState.SUCCEEDED
            scan.label_key = f"{results_key}/{Path(result.label_path).name}"
            scan.result_json_key = f"{results_key}/{Path(result.json_path).name}"
            scan.volumes_ml = {k: float(v) for k, v in result.volumes_ml.items()}
            scan.quality = {k: float(v) for k, v in result.quality.items()}
            scan.fallback = bool(result.fallback)
            scan.fallback_reason = result.fallback_reason
            scan.seconds = float(result.seconds)
        current.state = JobState.SUCCEEDED
        current.phase = None
        current.progress = 100.0
        current.finished_at = utcnow()
        current.device = device
        current.bundle_used = bundle_used
        current.reused_from_job = reused_from
        current.adapted_bundle_key = adapted_key
        current.adapt_seconds = round(segment_from - started, 3)
        current.segment_seconds = round(finished - segment_from, 3)
        if wants_push(current, ctx.settings.dicomweb_url):
            current.push_state = PushState.PENDING
        session.commit()


def run(job_id: str) -> None:
    """Claim and run a job; every outcome ends in a consistent record (or a re-queue for another try)."""
    ctx = get_context()
    token = uuid.uuid4().hex
    if not claim(ctx, job_id, token):
        log.info("job %s is not claimable (done, cancelled or running elsewhere); skipping", job_id)
        return
    with ctx.db.session() as session:
        job = session.get(Job, job_id)
    assert job is not None
    if job.attempts > ctx.settings.max_attempts:
        _fail(ctx, job_id, token, f"gave up after {job.attempts - 1} attempts: the worker was lost each time")
        return
    log.info("running job %s (attempt %d)", job_id, job.attempts)
    heartbeat = _Heartbeat(ctx, job_id, token)
    heartbeat.start()
    progress = _Progress(ctx, job_id, token, heartbeat)
    scratch = ctx.storage.scratch_dir()
    try:
        _execute(ctx, job, token, progress, scratch)
        log.info("job %s succeeded", job_id)
    except JobCancelled:
        log.info("job %s was cancelled while running", job_id)
    except (PermanentError, InputError, BundleError) as exc:
        log.warning("job %s failed: %s", job_id, exc)
        _fail(ctx, job_id, token, str(exc))
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        _retry_or_fail(ctx, job, token, exc)
    else:
        push_job(ctx, job_id)
    finally:
        heartbeat.stop.set()
        shutil.rmtree(scratch, ignore_errors=True)
