"""Job lifecycle shared by the API and the workers: creation, enqueueing, cancellation and recovery.

The database is the source of truth. A job is committed before its message is sent (and re-sent by the
recovery loop when sending failed or the message was lost), so an accepted job is never lost; workers claim a
job atomically, so duplicate messages are harmless.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.celery_app import PUSH_RESULTS_TASK, RUN_JOB_TASK
from service.config import Settings
from service.db import Database, DomainBundle, Job, Scan, utcnow
from service.health import live_workers, worker_timeout
from service.states import ACTIVE_STATES, JobSource, JobState, PushState, ScanState
from service.storage import Storage
from service.uploads import StagedScan

log = logging.getLogger(__name__)

SEND_GRACE = 10.0
"""Seconds a job's message may take to reach the broker's lists before recovery counts it as lost."""


def new_job_id() -> str:
    """A random job id."""
    return uuid.uuid4().hex


def input_key(job_id: str, scan: StagedScan) -> str:
    """Storage key of a scan's input (a file, or a folder for DICOM)."""
    return f"jobs/{job_id}/inputs/{scan.path.name}"


def job_record(
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
    source: JobSource = JobSource.UPLOAD,
    study_uid: str | None = None,
) -> Job:
    """A new queued job record without scans (not yet added to a session)."""
    return Job(
        id=job_id,
        client_id=client_id,
        state=JobState.QUEUED,
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


def create_job(db: Database, storage: Storage, job: Job, scans: list[StagedScan]) -> Job:
    """Move staged scans into storage under ``job`` (a :func:`job_record`) and commit it, queued."""
    for position, staged in enumerate(scans):
        key = input_key(job.id, staged)
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
                state=ScanState.PENDING,
                fallback=False,
            )
        )
    with db.session() as session:
        session.add(job)
        session.commit()
    return job


def enqueue(db: Database, celery: Celery, job_id: str, queue: str, *, countdown: float | None = None) -> bool:
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


def send_push(celery: Celery, job_id: str, queue: str) -> bool:
    """Queue the push-back of a job's results to the PACS; False when the broker cannot be reached."""
    try:
        celery.send_task(PUSH_RESULTS_TASK, args=[job_id], queue=queue, routing_key=queue, retry=False)
    except Exception as exc:
        log.warning("could not send the push of job %s to the broker: %s", job_id, exc)
        return False
    return True


def request_push(db: Database, celery: Celery, job: Job) -> bool:
    """Mark a job's push-back pending and queue it (the recovery loop re-sends it if queuing fails)."""
    with db.session() as session:
        session.execute(
            update(Job).where(Job.id == job.id).values(push_state=PushState.PENDING, push_error=None)
        )
        session.commit()
    return send_push(celery, job.id, job.queue)


def update_running(db: Database, job_id: str, token: str, **values: Any) -> bool:
    """Set ``values`` on the job if it is still running under ``token``; False when it was cancelled or
    taken over by another run."""
    with db.session() as session:
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.run_token == token, Job.state == JobState.RUNNING)
            .values(**values)
        ).rowcount
        session.commit()
    return bool(changed)


def domain_bundle(session: Session, job: Job) -> DomainBundle | None:
    """The cached adapted bundle of the job's client, bundle, adaptation method and domain."""
    return session.scalar(
        select(DomainBundle).where(
            DomainBundle.client_id == job.client_id,
            DomainBundle.bundle_name == job.bundle_name,
            DomainBundle.bundle_version == job.bundle_version,
            DomainBundle.adaptation == job.adaptation,
            DomainBundle.domain == job.domain,
        )
    )


def cancel(db: Database, celery: Celery, job: Job) -> bool:
    """Mark a queued or running job cancelled (the worker stops at its next progress report)."""
    with db.session() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state.in_(ACTIVE_STATES))
            .values(
                state=JobState.CANCELLED, phase=None, finished_at=utcnow(), error="cancelled by the client"
            )
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
        return session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED)) or 0


def broker_task_ids(celery: Celery, queues: Iterable[str]) -> set[str] | None:
    """Task ids of the messages the broker holds for ``queues``, waiting or delivered but not acknowledged.

    None when the broker cannot be listed (only Redis can; the filesystem broker keeps its messages on disk).
    """
    with celery.connection_for_read() as conn:
        if conn.transport.driver_type != "redis":
            return None
        channel = conn.default_channel
        client = channel.client
        prefix = getattr(client, "global_keyprefix", "")
        keys = {prefix + channel._q_for_pri(q, pri) for q in queues for pri in channel.priority_steps}
        waiting = [json.loads(raw) for key in sorted(keys) for raw in client.lrange(key, 0, -1)]
        delivered = [json.loads(raw)[0] for raw in client.hvals(prefix + channel.unacked_key)]
    return {message["headers"].get("id") for message in waiting + delivered} - {None}


def requeue_orphans(db: Database, celery: Celery, settings: Settings) -> list[str]:
    """Send running jobs whose run stopped back to the queue; returns their ids.

    A run has stopped when its job's heartbeat is older than ``stale_after``, or older than
    :func:`~service.health.worker_timeout` while its worker is not live either (killed, or gone with its
    machine).
    """
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after)
    silent = now - timedelta(seconds=worker_timeout(settings))
    not_beating = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < silent)
    with db.session() as session:
        live = live_workers(session, settings)
        candidates = session.execute(
            select(Job.id, Job.queue, Job.worker, Job.heartbeat_at).where(
                Job.state == JobState.RUNNING, not_beating
            )
        ).all()
    orphans = [
        (job_id, queue)
        for job_id, queue, worker, beat in candidates
        if worker not in live or beat is None or beat < stale
    ]
    resent: list[str] = []
    for job_id, queue in orphans:
        with db.session() as session:
            moved = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, not_beating)
                .values(state=JobState.QUEUED, phase=None, progress=0.0, run_token=None, worker=None)
            ).rowcount
            session.commit()
        if moved:
            log.warning("job %s lost its worker; re-queued", job_id)
            if enqueue(db, celery, job_id, queue):
                resent.append(job_id)
    return resent


def resend_lost(db: Database, celery: Celery, settings: Settings) -> list[str]:
    """Re-send queued jobs whose message never reached the broker or is no longer there; returns their ids.

    A message is lost when sending it failed, when the broker no longer holds it (a Redis restarted without
    persistence), or, where the broker cannot be listed, when it was sent ``requeue_queued_after`` ago.
    Duplicates are harmless: a worker claims a job atomically.
    """
    now = utcnow()
    sent_before = now - timedelta(seconds=SEND_GRACE)
    expired = now - timedelta(seconds=settings.requeue_queued_after)
    with db.session() as session:
        queued = session.execute(
            select(Job.id, Job.queue, Job.task_id, Job.enqueued_at).where(
                Job.state == JobState.QUEUED,
                or_(
                    Job.enqueued_at.is_(None) & (Job.created_at < sent_before),
                    Job.enqueued_at < sent_before,
                ),
            )
        ).all()
    if not queued:
        return []
    present = broker_task_ids(celery, {queue for _, queue, _, _ in queued})
    lost = [
        (job_id, queue)
        for job_id, queue, task_id, enqueued_at in queued
        if enqueued_at is None or (task_id not in present if present is not None else enqueued_at < expired)
    ]
    resent: list[str] = []
    for job_id, queue in lost:
        with db.session() as session:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED)
                .where(or_(Job.enqueued_at.is_(None), Job.enqueued_at < sent_before))
                .values(enqueued_at=now)
            ).rowcount
            session.commit()
        if claimed and enqueue(db, celery, job_id, queue):
            log.info("re-sent queued job %s", job_id)
            resent.append(job_id)
    return resent


def recover(db: Database, celery: Celery, settings: Settings) -> list[str]:
    """Re-queue the jobs of stopped runs and re-send lost messages; returns the ids of the jobs re-sent."""
    return requeue_orphans(db, celery, settings) + resend_lost(db, celery, settings)
