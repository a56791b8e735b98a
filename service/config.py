"""Service settings, read from environment variables with the ``TTASEG_`` prefix (see docs/service.md)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_device() -> str:
    """``cuda`` when a GPU is visible to torch, else ``cpu`` (torch imported only when asked)."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover - torch missing or broken
        return "cpu"


class Settings(BaseSettings):
    """All knobs of the API and the workers; every field maps to ``TTASEG_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="TTASEG_", extra="ignore")

    data_dir: Path = Field(
        Path("var"), description="Root for the default database, storage and broker folders."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL, e.g. `postgresql+psycopg://user:pw@host/db`; default a SQLite file "
        "`data_dir/ttaseg.db`.",
    )
    storage_dir: Path | None = Field(
        None, description="Local storage root (shared by API and workers); default `data_dir/storage`."
    )
    broker_url: str = Field("filesystem://", description="Celery broker, e.g. `redis://redis:6379/0`.")
    broker_dir: Path | None = Field(
        None, description="Folder of the filesystem broker; default `data_dir/broker`."
    )
    broker_poll_interval: float = Field(0.5, gt=0, description="Polling interval (s) of filesystem/Redis.")
    visibility_timeout: int = Field(
        21600,
        gt=0,
        description="Seconds before Redis redelivers an unacknowledged job; keep above the longest job.",
    )
    redis_key_prefix: str = Field(
        "", description="Prefix for broker keys in Redis (to share a Redis database)."
    )
    job_queue: str = Field("cpu", description="Queue the API sends jobs to (`cpu` or `gpu`).")
    worker_queues: str | None = Field(
        None, description="Comma-separated queues a worker consumes; default `gpu` on CUDA, else `cpu`."
    )
    worker_pool: Literal["prefork", "solo", "threads"] = Field(
        "solo", description="Celery pool of a worker (`solo`: the job runs in the worker process)."
    )
    device: str | None = Field(
        None, description="Torch device of a worker; default `cuda` if available, else `cpu`."
    )
    bundles: Path | None = Field(
        None,
        description="Bundle root of API and workers (and the CLI); default the repository's `bundles/`.",
    )

    api_keys: str = Field("", description="Comma-separated `client_id:sha256hex` pairs of accepted API keys.")
    api_keys_file: Path | None = Field(
        None, description="File with one `client_id sha256hex` per line (`#` comments)."
    )

    max_upload_bytes: int = Field(
        2 * 1024**3, gt=0, description="Largest request body accepted (413 above); 2 GiB."
    )
    max_unzipped_bytes: int = Field(
        8 * 1024**3, gt=0, description="Largest total size unpacked from the zips of one request; 8 GiB."
    )
    max_scans_per_job: int = Field(32, gt=0, description="Most scans in one job.")
    max_voxels_per_scan: int = Field(512 * 512 * 512, gt=0, description="Most voxels in one scan (512³).")
    max_steps: int = Field(500, gt=0, description="Largest accepted `steps`.")
    max_queued_jobs: int = Field(
        0, ge=0, description="Queued jobs from which `POST /v1/jobs` answers 429; 0 = off."
    )
    retry_after_seconds: int = Field(30, gt=0, description="`Retry-After` of 429 and 503 answers.")
    domain_policy: Literal["reuse", "always-adapt"] = Field(
        "reuse", description="`reuse` a domain's adapted bundle, or `always-adapt` (every job adapts)."
    )

    max_attempts: int = Field(
        3, gt=0, description="Runs of a job (worker lost or internal error) before failing."
    )
    heartbeat_interval: float = Field(10.0, gt=0, description="Seconds between job/worker heartbeats.")
    stale_after: float = Field(
        120.0, gt=0, description="A running job without heartbeat this long is re-run."
    )
    recovery_interval: float = Field(
        30.0, gt=0, description="Seconds between a worker's scans for lost jobs."
    )
    requeue_queued_after: float = Field(
        900.0, gt=0, description="Queued jobs are re-sent to the broker after this."
    )
    log_level: str = Field("INFO", description="Log level of API and workers.")

    dicomweb_url: str = Field(
        "", description="DICOMweb root of the PACS to pull studies from and push results to; empty: none."
    )
    dicomweb_username: str | None = Field(None, description="HTTP basic auth user towards the PACS.")
    dicomweb_password: SecretStr = Field(SecretStr(""), description="HTTP basic auth password.")
    push_retry_interval: float = Field(
        300.0,
        gt=0,
        description="Seconds before a failed (or stranded pending) push-back of results to the PACS is tried "
        "again.",
    )
    push_max_attempts: int = Field(
        5, gt=0, description="Push-backs the workers try on their own before leaving a job `push_failed`."
    )

    study_quiet_seconds: float = Field(
        30.0, gt=0, description="A study pushed over STOW-RS starts a job once no instance arrived this long."
    )
    routing_rules: Path | None = Field(
        None,
        description="YAML/JSON file of routing rules (model, adaptation, domain) for studies pushed over "
        "STOW-RS; unset: such studies start no job by themselves.",
    )

    web_dist: Path | None = Field(
        None, description="Folder of the built web app served at /ui; default service/web/dist."
    )

    pacs_viewer_url: str = Field(
        "",
        description="Link to a study in the PACS viewer, `{study_uid}` replaced, shown on jobs of PACS studies.",
    )

    @field_validator("job_queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        if not value or not value.replace("-", "").replace("_", "").isalnum():
            raise ValueError("queue names are alphanumeric")
        return value

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in data_dir."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'ttaseg.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        """The storage root, defaulting to data_dir/storage."""
        return (self.storage_dir or self.data_dir / "storage").resolve()

    @property
    def resolved_broker_dir(self) -> Path:
        """The filesystem broker folder, defaulting to data_dir/broker."""
        return (self.broker_dir or self.data_dir / "broker").resolve()

    @property
    def resolved_device(self) -> str:
        """The worker's torch device."""
        return self.device or _default_device()

    @property
    def resolved_worker_queues(self) -> list[str]:
        """Queues a worker consumes."""
        if self.worker_queues:
            return [q.strip() for q in self.worker_queues.split(",") if q.strip()]
        return ["gpu"] if self.resolved_device.startswith("cuda") else ["cpu"]


def _default_text(value: object) -> str:
    if value is None:
        return "none"
    if value == "":
        return "empty"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def settings_table() -> str:
    """The Markdown table of every setting: environment variable, default and meaning (docs/service.md)."""
    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        rows.append(f"| `{prefix}{name.upper()}` | {_default_text(info.default)} | {info.description} |")
    return "\n".join(rows) + "\n"


@lru_cache
def get_settings() -> Settings:
    """Process-wide settings (cached; tests clear the cache after changing the environment)."""
    return Settings()
