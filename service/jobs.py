"""Job lifecycle shared by the API and the workers: creation, enqueueing, cancellation and recovery.

The database is the source of truth. A job is committed before its message is sent (and re-sent by the
recovery loop when sending failed or the message was lost), so an accepted job is never lost; workers claim a
job atomically, so duplicate messages are harmless.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from celery import Celery
from sqlalchemy import func, or_, select, update

from service.celery_app import RUN_JOB_TASK
from service.db import Database, Job, Scan, utcnow
from service.storage import Storage
from service.uploads import StagedScan

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")


def new_job_id() -> str:
    """A random job id."""
    return uuid.uuid4().hex


def input_key(job_id: str, scan: StagedScan) -> str:
    """Storage key of a scan's input (a file, or a folder for DICOM)."""
    return f"jobs/{job_id}/inputs/{scan.path.name}"


def create_job(
    db: Database,
    storage: Storage,
    *,
    job_id: str,
    client_id: str,
    model_ref: str,
    bundle_name: str,
    bundle_version: str,
    labels: dict[str, str],
    adaptation: str,
    steps: int | None,
    domain: str | None,
    queue: str,
    scans: list[StagedScan],
    source: str = "upload",
    study_uid: str | None = None,
) -> Job:
    """Move staged scans into storage and commit a queued job record."""
    job = Job(
        id=job_id,
        client_id=client_id,
        state="queued",
        progress=0.0,
        source=source,
        study_uid=study_uid,
        model_ref=model_ref,
        bundle_name=bundle_name,
        bundle_version=bundle_version,
        labels=labels,
        adaptation=adaptation,
        steps=steps,
        domain=domain,
        queue=queue,
        attempts=0,
    )
    for position, staged in enumerate(scans):
        key = input_key(job_id, staged)
        storage.put_path(key, staged.path, move=True)
        job.scans.append(
            Scan(
                position=position,
                name=staged.name,
                kind=staged.kind,
                input_key=key,
                input_bytes=staged.size,
                sha256=staged.sha256,
                files=staged.files,
                size=staged.shape,
                spacing=staged.spacing,
                state="pending",
                fallback=False,
            )
        )
    with db.session() as session:
        session.add(job)
        session.commit()
    return job


def enqueue(db: Database, celery: Celery, job_id: str, queue: str, countdown: float | None = None) -> bool:
    """Send the job's task and record the send; False (the job stays queued for recovery) on failure."""
    task_id = uuid.uuid4().hex
    try:
        celery.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=queue,
            routing_key=queue,
            task_id=task_id,
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )
    except Exception as exc:
        log.warning("could not send job %s to the broker (will be re-sent): %s", job_id, exc)
        return False
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow(), task_id=task_id))
        session.commit()
    return True


def cancel(db: Database, celery: Celery, job: Job) -> bool:
    """Mark a queued or running job cancelled (the worker stops at its next progress report)."""
    with db.session() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state.in_(ACTIVE_STATES))
            .values(state="cancelled", phase=None, finished_at=utcnow(), error="cancelled by the client")
        )
        session.commit()
    if result.rowcount and job.task_id:
        try:
            celery.control.revoke(job.task_id)
        except Exception as exc:  # best effort: the worker also checks the job state
            log.info("revoke of %s failed: %s", job.task_id, exc)
    return bool(result.rowcount)


def queued_count(db: Database) -> int:
    """Jobs waiting for a worker."""
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued")) or 0


def recover(db: Database, celery: Celery, stale_after: float, requeue_after: float) -> list[str]:
    """Re-send jobs whose worker is gone (stale heartbeat) and queued jobs whose message may be lost."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_after)
    resent: list[str] = []
    with db.session() as session:
        running = session.execute(
            select(Job.id, Job.queue).where(
                Job.state == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale)
            )
        ).all()
        queued = session.execute(
            select(Job.id, Job.queue).where(
                Job.state == "queued",
                or_(
                    Job.enqueued_at.is_(None) & (Job.created_at < now - timedelta(seconds=10)),
                    Job.enqueued_at < now - timedelta(seconds=requeue_after),
                ),
            )
        ).all()
    for job_id, queue in running:
        with db.session() as session:
            moved = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.state == "running",
                    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale),
                )
                .values(state="queued", phase=None, progress=0.0, run_token=None, worker=None)
            ).rowcount
            session.commit()
        if moved:
            log.warning("job %s lost its worker; re-queued", job_id)
            if enqueue(db, celery, job_id, queue):
                resent.append(job_id)
    for job_id, queue in queued:
        with db.session() as session:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .where(
                    or_(Job.enqueued_at.is_(None), Job.enqueued_at < now - timedelta(seconds=requeue_after))
                )
                .values(enqueued_at=now)
            ).rowcount
            session.commit()
        if claimed and enqueue(db, celery, job_id, queue):
            log.info("re-sent queued job %s", job_id)
            resent.append(job_id)
    return resent
