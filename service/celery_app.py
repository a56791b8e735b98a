"""The Celery app and its task names: the API sends tasks by name, the workers (`workers.tasks`) register them.

Both sides import this module; it imports nothing of the workers."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.config import Settings

RUN_JOB_TASK = "ttaseg.run_job"
PUSH_RESULTS_TASK = "ttaseg.push_results"
QUEUES = ("cpu", "gpu")


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """Transport options for the configured broker (filesystem folders, Redis visibility timeout)."""
    if settings.broker_url.startswith("filesystem"):
        root = settings.resolved_broker_dir
        folders = {name: root / name for name in ("queue", "processed", "control")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
            "polling_interval": settings.broker_poll_interval,
        }
    options: dict[str, object] = {
        "visibility_timeout": settings.visibility_timeout,
        "polling_interval": settings.broker_poll_interval,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
    }
    if settings.redis_key_prefix:
        options["global_keyprefix"] = settings.redis_key_prefix
    return options


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for durable, one-at-a-time job execution."""
    app = Celery("ttaseg")
    queues = {settings.job_queue, *QUEUES}
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool=settings.worker_pool,
        worker_hijack_root_logger=False,
        task_default_queue=settings.job_queue,
        task_queues=[Queue(name, routing_key=name) for name in sorted(queues)],
        task_create_missing_queues=True,
        worker_send_task_events=False,
        timezone="UTC",
    )
    return app
