"""Alembic environment: migrates the connection handed over by :func:`service.db.migrate`."""

from alembic import context
from sqlalchemy import create_engine

from service.config import get_settings
from service.db import Base

target_metadata = Base.metadata


def run() -> None:
    """Run migrations online, on the given connection or on the configured database."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        with create_engine(get_settings().resolved_database_url).connect() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
