"""Start a worker: ``python -m workers`` (queues, device and pool from TTASEG_* settings)."""

from __future__ import annotations

import logging
import os
import socket

from service.config import get_settings
from service.db import Database, migrate
from workers import context, housekeeping
from workers.tasks import make_worker_app


def main() -> None:
    """Migrate the database if needed, then run a Celery worker with one job at a time."""
    settings = get_settings()
    settings = settings.model_copy(update={"device": settings.resolved_device})
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    migrate(Database(settings.resolved_database_url).engine)
    import models.pipeline  # noqa: F401  (imported once, before the first job)

    celery = make_worker_app(settings)
    context.configure(settings, celery)
    housekeeping.install()
    queues = ",".join(settings.resolved_worker_queues)
    celery.worker_main(
        [
            "worker",
            f"--queues={queues}",
            f"--pool={settings.worker_pool}",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            f"--hostname=ttaseg-{queues.replace(',', '-')}-{os.getpid()}@{socket.gethostname()}",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


if __name__ == "__main__":
    main()
