"""Celery task definitions (the ML core is imported lazily, inside the task)."""

from __future__ import annotations

from service.celery_app import RUN_JOB_TASK, make_celery

celery_app = make_celery()


@celery_app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> None:
    """Run one job to completion (idempotent: duplicate or redelivered messages are no-ops)."""
    from workers.runner import run

    run(job_id)
