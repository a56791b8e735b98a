"""Per-process resources of a worker: settings, database, storage and the Celery app (rebuilt after fork)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from celery import Celery

from service.config import Settings, get_settings
from service.db import Database
from service.storage import Storage, get_storage


@dataclass
class Context:
    """What a job run needs besides the ML core."""

    settings: Settings
    db: Database
    storage: Storage
    celery: Celery


_contexts: dict[int, Context] = {}


def get_context() -> Context:
    """This process's context (one per PID, so forked pool children never share connections)."""
    pid = os.getpid()
    if pid not in _contexts:
        from workers.tasks import celery_app

        settings = get_settings()
        _contexts[pid] = Context(
            settings=settings,
            db=Database(settings.resolved_database_url),
            storage=get_storage(settings.resolved_storage_dir),
            celery=celery_app,
        )
    return _contexts[pid]
