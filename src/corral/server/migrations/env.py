"""Alembic's entry point for Corral's store: runs the migrations on the configured database."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from corral.server.tables import Base


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:  # the caller's (PostgreSQL: asyncpg's, under the migration lock)
    _run(given)
else:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()
