"""The store's schema (see `corral.server.store`); the Alembic migrations in
`corral.server.migrations` create and upgrade it."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# 64-bit on PostgreSQL (migration 0011); SQLite's INTEGER already is, and only INTEGER itself
# makes an autoincrementing row id there.
WideInteger = BigInteger().with_variant(Integer(), "sqlite")


def insert_into(session: AsyncSession, table: type[Base]) -> sqlite.Insert | postgresql.Insert:
    """An INSERT in the dialect of the session's database, so that it can say ON CONFLICT
    (SQLite and PostgreSQL spell it alike)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


class KeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(16))  # the key's first characters, for lists
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (Index("ix_images_owner_name", "owner", "name", unique=True),)

    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class VolumeRow(Base):
    __tablename__ = "volumes"
    __table_args__ = (Index("ix_volumes_owner_name", "owner", "name", unique=True),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    name: Mapped[str] = mapped_column(String(64))
    size_mb: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class SandboxRow(Base):
    __tablename__ = "sandboxes"
    __table_args__ = (Index("ix_sandboxes_owner_state", "owner", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    state: Mapped[str] = mapped_column(String(16))
    runtime: Mapped[str] = mapped_column(String(32))
    spec: Mapped[str] = mapped_column(Text)  # JSON
    history: Mapped[str] = mapped_column(Text, default="[]")  # JSON
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    end_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    end_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    node: Mapped[str | None] = mapped_column(String(64), nullable=True)


class BlobRow(Base):
    """Content a key uploaded (or proved it holds by uploading it): the files are shared by
    digest, the right to use them is not."""

    __tablename__ = "blobs"

    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    size: Mapped[int] = mapped_column(WideInteger)
    created_at: Mapped[float] = mapped_column(Float)


class QuotaRow(Base):
    """A key's quota (see `corral.core.quota`); a key without a row, or a null field, has no
    limit there."""

    __tablename__ = "quotas"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    cpu: Mapped[float | None] = mapped_column(Float, nullable=True)
    memory_mb: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    disk_mb: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    volume_mb: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    snapshot_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    blob_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class PreviewRow(Base):
    """A port of a sandbox opened to HTTP clients (see `corral.server.previews`): the token's
    digest only, never the token."""

    __tablename__ = "previews"
    __table_args__ = (Index("ix_previews_sandbox", "sandbox_id", "port"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    sandbox_id: Mapped[str] = mapped_column(String(32))
    port: Mapped[int] = mapped_column(Integer)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class DeploymentRow(Base):
    """A deployment (see `corral.server.deployments`): its current version's spec as JSON and
    the sandbox serving it."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    name: Mapped[str] = mapped_column(String(64), unique=True)
    spec: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    instance: Mapped[str | None] = mapped_column(String(32), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class KeyNetworkRow(Base):
    """A key's default egress rules (see `corral.server.key_network`), as JSON."""

    __tablename__ = "key_networks"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    rules: Mapped[str] = mapped_column(Text)


class WebhookRow(Base):
    """A URL sandbox events are POSTed to (see `corral.server.webhooks`); its secret sealed."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text)
    events: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class AuditRow(Base):
    """One API action (see `corral.server.audit`); `detail` is JSON, never a secret's value."""

    __tablename__ = "audit"
    __table_args__ = (
        Index("ix_audit_key_at", "key_id", "at"),
        Index("ix_audit_sandbox_at", "sandbox_id", "at"),
        Index("ix_audit_at", "at"),
    )

    id: Mapped[int] = mapped_column(WideInteger, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    client: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    operation: Mapped[str] = mapped_column(String(200))
    sandbox_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bytes_in: Mapped[int] = mapped_column(BigInteger)
    bytes_out: Mapped[int] = mapped_column(BigInteger)
    duration: Mapped[float] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(Text)
