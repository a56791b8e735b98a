"""Per-process resources of a worker, built from the settings and Celery app its entry point hands over."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from celery import Celery

from service.config import Settings
from service.db import Database
from service.storage import Storage, get_storage


@dataclass(frozen=True)
class WorkerSetup:
    """What the entry point decided once, in the worker's main process: settings, Celery app and name."""

    settings: Settings
    celery: Celery
    name: str


@dataclass
class Context:
    """What a job run needs besides the ML core; ``name`` identifies the worker in the workers table and on
    the jobs it runs."""

    settings: Settings
    db: Database
    storage: Storage
    celery: Celery
    name: str


_setup: list[WorkerSetup] = []
_contexts: dict[int, Context] = {}


def worker_name() -> str:
    """A name unique to this start of a worker: host, process id and a random suffix (a restarted container
    may reuse both host name and process id)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def configure(settings: Settings, celery: Celery) -> WorkerSetup:
    """Record this worker's settings and Celery app (in the main process, before a pool forks)."""
    _setup[:] = [WorkerSetup(settings, celery, worker_name())]
    _contexts.clear()
    return _setup[0]


def get_context() -> Context:
    """This process's context (one per PID, so forked pool children never share database connections)."""
    if not _setup:
        raise RuntimeError("workers.context.configure() was not called")
    pid = os.getpid()
    if pid not in _contexts:
        setup = _setup[0]
        _contexts[pid] = Context(
            settings=setup.settings,
            db=Database(setup.settings.resolved_database_url),
            storage=get_storage(setup.settings.resolved_storage_dir),
            celery=setup.celery,
            name=setup.name,
        )
    return _contexts[pid]
