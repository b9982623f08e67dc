"""The store's database: SQLite in the data directory (the default) or a PostgreSQL server
shared by servers (`--database-url`), opened and brought to the newest schema by the Alembic
migrations in `corral.server.migrations`."""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from corral.core.errors import InvalidRequest, ServiceUnavailable

MIGRATION_LOCK = 0x636F7272616C  # PostgreSQL advisory lock id held while migrating ("corral")


async def open_database(database: Path | str) -> AsyncEngine:
    """The engine of the SQLite database at the path `database` (created as needed) or of the
    PostgreSQL database at the URL `database` (which must exist), migrated."""
    if isinstance(database, Path):
        await asyncio.to_thread(_prepare_sqlite, database)
        engine = create_async_engine(f"sqlite+aiosqlite:///{database}")
        event.listen(engine.sync_engine, "connect", _on_connect)
        return engine
    url = postgres_url(database)
    if importlib.util.find_spec("asyncpg") is None:
        raise InvalidRequest(
            "a PostgreSQL store needs the asyncpg driver: pip install 'corral[postgres]'",
            code="postgres_driver_missing",
        )
    engine = create_async_engine(url, pool_pre_ping=True)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_migrate_locked)
    except (OSError, SQLAlchemyError) as exc:
        await engine.dispose()
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise ServiceUnavailable(
            f"cannot open the PostgreSQL store ({type(exc).__name__}: {detail}); check the "
            "database URL, that the server is up and that the database exists",
            code="store_unavailable",
        ) from None
    return engine


def migrate(url: str | None, connection: Connection | None = None) -> None:
    """Bring the database at `url` (a synchronous SQLAlchemy URL), or the one `connection` is
    open on, to the newest schema."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("corral.server") / "migrations"))
    if url is not None:  # "%" is interpolation to the config's parser: a path may hold one
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def postgres_url(url: str) -> str:
    """`url` for SQLAlchemy's asyncpg driver; refused unless it names a PostgreSQL database."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+asyncpg") or not rest:
        raise InvalidRequest(
            "the database URL must be postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE "
            "(without one, the server keeps its store in SQLite in its data directory)",
            code="invalid_database_url",
        )
    return f"postgresql+asyncpg://{rest}"


def _migrate_locked(connection: Connection) -> None:
    # Servers sharing one PostgreSQL database may start together: one migrates at a time.
    connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK})
    migrate(None, connection)


def _prepare_sqlite(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    migrate(f"sqlite:///{path}")
    path.chmod(0o600)  # key digests and sandbox environments are nobody else's business
    with sqlite3.connect(path) as db:  # WAL: the CLI reads while the server writes
        db.execute("PRAGMA journal_mode=WAL")


def _on_connect(connection: Any, _record: Any) -> None:
    # With WAL, NORMAL syncs at checkpoints rather than at every commit: a crash of the server
    # loses nothing and the database never corrupts; a power cut may forget the last commits,
    # which at most concern sandboxes that the power cut ended anyway.
    connection.execute("PRAGMA synchronous=NORMAL")
