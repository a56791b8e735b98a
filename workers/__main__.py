"""Start a worker: ``python -m workers`` (queues, device and pool from TTASEG_* settings)."""

from __future__ import annotations

import logging
import os
import socket

from service.config import get_settings
from service.db import Database, migrate


def main() -> None:
    """Migrate the database if needed, then run a Celery worker with one job at a time."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    migrate(Database(settings.resolved_database_url).engine)
    os.environ.setdefault("TTASEG_DEVICE", settings.resolved_device)
    import models.pipeline  # noqa: F401  (imported once, before the first job)
    import workers.housekeeping  # noqa: F401  (connects the worker signals)
    from workers.tasks import celery_app

    queues = ",".join(settings.resolved_worker_queues)
    celery_app.worker_main(
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
