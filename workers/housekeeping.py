"""Worker housekeeping: the worker's heartbeat row (readiness) and the recovery of lost jobs.

Every beat (``heartbeat_interval``) refreshes the row and re-queues the jobs of dead workers; every
``recovery_interval`` queued jobs whose broker message was lost are re-sent, and so are failed or stranded
push-backs of results to the PACS (:func:`workers.pushback.retry_pushes`). Every beat, studies pushed over
STOW-RS that became quiet start their jobs (:func:`workers.autostart.start_quiet_studies`).
"""

from __future__ import annotations

import logging
import os
import threading

from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import delete

from service.db import Worker, utcnow
from service.jobs import requeue_orphans, resend_lost
from workers.autostart import start_quiet_studies
from workers.context import Context, get_context
from workers.pushback import retry_pushes

log = logging.getLogger(__name__)

_stop = threading.Event()


def beat(ctx: Context) -> None:
    """Insert or refresh this worker's row."""
    with ctx.db.session() as session:
        row = session.get(Worker, ctx.name)
        if row is None:
            row = Worker(
                hostname=ctx.name,
                queues=",".join(ctx.settings.resolved_worker_queues),
                device=ctx.settings.resolved_device,
                pid=os.getpid(),
                started_at=utcnow(),
            )
            session.add(row)
        row.last_seen = utcnow()
        session.commit()


def _loop(ctx: Context) -> None:
    settings = ctx.settings
    step = min(settings.heartbeat_interval, settings.recovery_interval)
    elapsed, next_resend = 0.0, 0.0
    while True:
        try:
            beat(ctx)
            requeue_orphans(ctx.db, ctx.celery, settings)
            if elapsed >= next_resend:
                next_resend = elapsed + settings.recovery_interval
                resend_lost(ctx.db, ctx.celery, settings)
                retry_pushes(ctx)
            start_quiet_studies(ctx)
        except Exception as exc:  # keep beating through database or broker hiccups
            log.warning("worker housekeeping failed: %s", exc)
        if _stop.wait(step):
            return
        elapsed += step


def _on_ready(**_: object) -> None:
    _stop.clear()
    threading.Thread(target=_loop, args=(get_context(),), daemon=True, name="ttaseg-housekeeping").start()


def _on_shutdown(**_: object) -> None:
    _stop.set()
    try:
        ctx = get_context()
        with ctx.db.session() as session:
            session.execute(delete(Worker).where(Worker.hostname == ctx.name))
            session.commit()
    except Exception as exc:
        log.warning("could not remove worker row: %s", exc)


def install() -> None:
    """Start the housekeeping when the worker is ready; remove the worker's row when it shuts down."""
    worker_ready.connect(_on_ready, weak=False)
    worker_shutdown.connect(_on_shutdown, weak=False)
