"""Initial schema: jobs, scans, domain_bundles, workers.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(16)),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("study_uid", sa.String(64)),
        sa.Column("model_ref", sa.String(200), nullable=False),
        sa.Column("bundle_name", sa.String(200), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("adaptation", sa.String(16), nullable=False),
        sa.Column("steps", sa.Integer),
        sa.Column("domain", sa.String(64)),
        sa.Column("queue", sa.String(32), nullable=False),
        sa.Column("device", sa.String(32)),
        sa.Column("bundle_used", sa.String(300)),
        sa.Column("adapted_bundle_key", sa.String(500)),
        sa.Column("reused_from_job", sa.String(32)),
        sa.Column("error", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("task_id", sa.String(64)),
        sa.Column("run_token", sa.String(32)),
        sa.Column("worker", sa.String(255)),
        sa.Column("adapt_seconds", sa.Float),
        sa.Column("segment_seconds", sa.Float),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("enqueued_at", sa.DateTime),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("heartbeat_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_jobs_client_id", "jobs", ["client_id"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_table(
        "scans",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("input_key", sa.String(500), nullable=False),
        sa.Column("input_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("files", sa.Integer, nullable=False),
        sa.Column("size", sa.JSON),
        sa.Column("spacing", sa.JSON),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("label_key", sa.String(500)),
        sa.Column("result_json_key", sa.String(500)),
        sa.Column("volumes_ml", sa.JSON),
        sa.Column("quality", sa.JSON),
        sa.Column("fallback", sa.Boolean, nullable=False),
        sa.Column("fallback_reason", sa.Text),
        sa.Column("seconds", sa.Float),
        sa.UniqueConstraint("job_id", "name", name="uq_scans_job_name"),
    )
    op.create_index("ix_scans_job_id", "scans", ["job_id"])
    op.create_table(
        "domain_bundles",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("bundle_name", sa.String(200), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("adaptation", sa.String(16), nullable=False),
        sa.Column("domain", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(500), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint(
            "client_id", "bundle_name", "bundle_version", "adaptation", "domain", name="uq_domain_bundles_key"
        ),
    )
    op.create_table(
        "workers",
        sa.Column("hostname", sa.String(255), primary_key=True),
        sa.Column("queues", sa.String(200), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
    )
    op.create_index("ix_workers_last_seen", "workers", ["last_seen"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("domain_bundles")
    op.drop_index("ix_scans_job_id", "scans")
    op.drop_table("scans")
    op.drop_table("jobs")
