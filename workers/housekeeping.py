"""Worker process housekeeping: worker heartbeat rows (readiness) and the loop that re-sends lost jobs."""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import delete

from service.db import Worker, utcnow
from service.jobs import recover
from workers.context import get_context

log = logging.getLogger(__name__)

_stop = threading.Event()


def worker_id() -> str:
    """Identity of this worker process in the workers table."""
    return f"{socket.gethostname()}:{os.getpid()}"


def beat() -> None:
    """Insert or refresh this worker's row."""
    ctx = get_context()
    with ctx.db.session() as session:
        row = session.get(Worker, worker_id())
        if row is None:
            row = Worker(
                hostname=worker_id(),
                queues=",".join(ctx.settings.resolved_worker_queues),
                device=ctx.settings.resolved_device,
                pid=os.getpid(),
                started_at=utcnow(),
            )
            session.add(row)
        row.last_seen = utcnow()
        session.commit()


def _loop() -> None:
    ctx = get_context()
    next_recovery = 0.0
    elapsed = 0.0
    while True:
        try:
            beat()
            if elapsed >= next_recovery:
                recover(ctx.db, ctx.celery, ctx.settings.stale_after, ctx.settings.requeue_queued_after)
                next_recovery = elapsed + ctx.settings.recovery_interval
        except Exception as exc:  # keep beating through database or broker hiccups
            log.warning("worker housekeeping failed: %s", exc)
        step = min(ctx.settings.heartbeat_interval, ctx.settings.recovery_interval)
        if _stop.wait(step):
            return
        elapsed += step


@worker_ready.connect
def _on_ready(**_: object) -> None:
    threading.Thread(target=_loop, daemon=True, name="ttaseg-housekeeping").start()


@worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    _stop.set()
    try:
        ctx = get_context()
        with ctx.db.session() as session:
            session.execute(delete(Worker).where(Worker.hostname == worker_id()))
            session.commit()
    except Exception as exc:
        log.warning("could not remove worker row: %s", exc)
