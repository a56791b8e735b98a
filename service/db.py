"""Job records (SQLAlchemy 2.0): jobs, scans, the per-domain adapted-bundle cache, worker heartbeats and the
studies pushed over STOW-RS that were started automatically."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from service.states import JobSource, PushState, ScanState

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def utcnow() -> datetime:
    """Timezone-aware current UTC time."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, identically on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    """Declarative base of the service's tables."""


class Job(Base):
    """One submitted job: one or more scans adapted together with one bundle."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[str | None] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    source: Mapped[str] = mapped_column(String(16), default=JobSource.UPLOAD)
    study_uid: Mapped[str | None] = mapped_column(String(64))
    model_ref: Mapped[str] = mapped_column(String(200))
    bundle_name: Mapped[str] = mapped_column(String(200))
    bundle_version: Mapped[str] = mapped_column(String(64))
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    adaptation: Mapped[str] = mapped_column(String(16))
    steps: Mapped[int | None] = mapped_column(Integer)
    domain: Mapped[str | None] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(32))
    device: Mapped[str | None] = mapped_column(String(32))
    bundle_used: Mapped[str | None] = mapped_column(String(300))
    adapted_bundle_key: Mapped[str | None] = mapped_column(String(500))
    reused_from_job: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(64))
    run_token: Mapped[str | None] = mapped_column(String(32))
    worker: Mapped[str | None] = mapped_column(String(255))
    adapt_seconds: Mapped[float | None] = mapped_column(Float)
    segment_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    push_state: Mapped[str] = mapped_column(String(16), default=PushState.NONE, server_default=PushState.NONE)
    push_error: Mapped[str | None] = mapped_column(Text)
    push_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pushed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    scans: Mapped[list[Scan]] = relationship(
        back_populates="job", order_by="Scan.position", cascade="all, delete-orphan", lazy="selectin"
    )


class Scan(Base):
    """One input scan of a job and, once done, its results."""

    __tablename__ = "scans"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_scans_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    input_key: Mapped[str] = mapped_column(String(500))
    input_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(
        String(64),
        doc="Content digest of the scan's input: ``models.checksums.sha256_file`` of an image file, or for a "
        "DICOM series ``models.checksums.series_sha256`` of its files' digests (independent of file order and "
        "names, the same whether uploaded, pushed or pulled from a PACS).",
    )
    files: Mapped[int] = mapped_column(Integer, default=1)
    size: Mapped[list[int] | None] = mapped_column(JSON)
    spacing: Mapped[list[float] | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=ScanState.PENDING)
    label_key: Mapped[str | None] = mapped_column(String(500))
    result_json_key: Mapped[str | None] = mapped_column(String(500))
    volumes_ml: Mapped[dict[str, float] | None] = mapped_column(JSON)
    quality: Mapped[dict[str, float] | None] = mapped_column(JSON)
    fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    fallback_reason: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="scans")


class DomainBundle(Base):
    """Latest adapted bundle per client, model, adaptation method and domain (the per-domain cache)."""

    __tablename__ = "domain_bundles"
    __table_args__ = (
        UniqueConstraint(
            "client_id", "bundle_name", "bundle_version", "adaptation", "domain", name="uq_domain_bundles_key"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    client_id: Mapped[str] = mapped_column(String(128))
    bundle_name: Mapped[str] = mapped_column(String(200))
    bundle_version: Mapped[str] = mapped_column(String(64))
    adaptation: Mapped[str] = mapped_column(String(16))
    domain: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    job_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IncomingStudy(Base):
    """A study a client pushed over STOW-RS, claimed once by the automatic start (started or unrouted)."""

    __tablename__ = "incoming_studies"
    __table_args__ = (UniqueConstraint("client_id", "study_uid", name="uq_incoming_studies_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    client_id: Mapped[str] = mapped_column(String(128))
    study_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Worker(Base):
    """Heartbeat of a running worker (readiness and monitoring)."""

    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(32))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


def make_engine(url: str) -> Engine:
    """Engine with SQLite tuned for several processes (WAL, busy timeout, immediate transactions)."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Any]:
    """Serialise migrations of processes starting together; yields the connection to migrate with."""
    if engine.dialect.name == "sqlite":
        lock_path = Path(engine.url.database or "ttaseg.db").with_suffix(".migrate.lock")
        with lock_path.open("a") as lock, engine.connect() as conn:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield conn
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7310411)"))
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7310411)"))
                conn.commit()
    else:
        with engine.connect() as conn:
            yield conn


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _migration_lock(engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()


class Database:
    """Engine plus session factory."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        """A new session (use as a context manager)."""
        return self.sessions()

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
