"""Readiness of the service: database, storage, broker, a live worker, and no job waiting without one.

A worker is live while its row in the workers table was refreshed within :func:`worker_timeout`; the
recovery of lost jobs (``service.jobs``) and the readiness checks share that definition.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import Database, Job, Worker, utcnow
from service.states import JobState
from service.storage import Storage

CHECK_TIMEOUT = 5.0


def worker_timeout(settings: Settings) -> float:
    """Seconds without a heartbeat after which a worker counts as gone (two missed beats and a margin)."""
    return 2 * settings.heartbeat_interval + 5


def live_workers(session: Session, settings: Settings) -> dict[str, list[str]]:
    """Queues of each live worker, by worker name."""
    fresh = utcnow() - timedelta(seconds=worker_timeout(settings))
    rows = session.execute(select(Worker.hostname, Worker.queues).where(Worker.last_seen >= fresh)).all()
    return {name: queues.split(",") for name, queues in rows}


def check_worker(db: Database, settings: Settings) -> None:
    """Raise unless a live worker consumes the queue the API sends jobs to."""
    with db.session() as session:
        workers = live_workers(session, settings)
    if not any(settings.job_queue in queues for queues in workers.values()):
        raise RuntimeError(f"no live worker consumes queue {settings.job_queue!r}")


def check_queues(db: Database, settings: Settings) -> None:
    """Raise when jobs wait on a queue that no live worker consumes."""
    with db.session() as session:
        served = {q for queues in live_workers(session, settings).values() for q in queues}
        waiting = session.execute(
            select(Job.queue, func.count()).where(Job.state == JobState.QUEUED).group_by(Job.queue)
        ).all()
    stranded = sorted(
        f"{count} job{'s' if count != 1 else ''} waiting on queue {queue} with no live worker"
        for queue, count in waiting
        if queue not in served
    )
    if stranded:
        raise RuntimeError("; ".join(stranded))


def check_broker(celery: Celery) -> None:
    """Raise unless the broker accepts a connection."""
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)


def readiness(
    settings: Settings, *, db: Database, storage: Storage, celery: Celery, pool: Executor
) -> tuple[bool, dict[str, str]]:
    """Run every check in ``pool`` (each bounded by :data:`CHECK_TIMEOUT`); whether all passed, and each
    check's ``ok`` or reason."""
    checks: dict[str, Callable[[], None]] = {
        "database": db.ping,
        "storage": storage.probe,
        "broker": lambda: check_broker(celery),
        "worker": lambda: check_worker(db, settings),
        "queue": lambda: check_queues(db, settings),
    }
    futures = {name: pool.submit(fn) for name, fn in checks.items()}
    results: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=CHECK_TIMEOUT)
            results[name] = "ok"
        except FutureTimeout:
            results[name] = "timed out"
        except Exception as exc:
            results[name] = f"failed: {exc}"[:300]
    return all(v == "ok" for v in results.values()), results
