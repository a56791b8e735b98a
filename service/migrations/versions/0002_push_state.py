"""Push-back of results to the PACS: push_state, push_error, push_attempts and pushed_at on jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("push_state", sa.String(16), nullable=False, server_default="none"))
    op.add_column("jobs", sa.Column("push_error", sa.Text))
    op.add_column("jobs", sa.Column("push_attempts", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("pushed_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pushed_at")
        batch.drop_column("push_attempts")
        batch.drop_column("push_error")
        batch.drop_column("push_state")
