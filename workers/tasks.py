"""The workers' Celery app: the service's app (``service.celery_app``) with the job and push tasks registered."""

from __future__ import annotations

from celery import Celery

from service.celery_app import PUSH_RESULTS_TASK, RUN_JOB_TASK, make_celery
from service.config import Settings
from workers.pushback import run_push
from workers.runner import run


def run_job(job_id: str) -> None:
    """Run one job to completion (idempotent: duplicate or redelivered messages are no-ops)."""
    run(job_id)


def make_worker_app(settings: Settings) -> Celery:
    """The Celery app of a worker, built from ``settings``, with :func:`run_job` registered."""
    app = make_celery(settings)
    app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(run_job)
    app.task(name=PUSH_RESULTS_TASK, acks_late=True, ignore_result=True)(run_push)
    return app
