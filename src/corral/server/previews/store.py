"""Previews in the store: which port of which sandbox is open, to whom (a token's digest, or
anyone for a public one), until when."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.server.tables import PreviewRow


@dataclasses.dataclass(frozen=True)
class PreviewEntry:
    id: str
    owner: str
    sandbox_id: str
    port: int
    public: bool
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def active(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _entry(row: PreviewRow) -> PreviewEntry:
    return PreviewEntry(
        id=row.id,
        owner=row.owner,
        sandbox_id=row.sandbox_id,
        port=row.port,
        public=row.public,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


class PreviewStore:
    """The `previews` table."""

    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    async def add(self, entry: PreviewEntry, digest: str) -> None:
        async with self._session.begin() as session:
            session.add(PreviewRow(**entry.to_dict(), digest=digest))

    async def by_digest(self, digest: str) -> PreviewEntry | None:
        async with self._session() as session:
            row = await session.scalar(select(PreviewRow).where(PreviewRow.digest == digest))
            return _entry(row) if row is not None else None

    async def public(self, sandbox_id: str, port: int) -> bool:
        """Whether a public preview of `port` is active."""
        now = time.time()
        async with self._session() as session:
            found = await session.scalar(
                select(PreviewRow.id).where(
                    PreviewRow.sandbox_id == sandbox_id,
                    PreviewRow.port == port,
                    PreviewRow.public.is_(True),
                    PreviewRow.revoked_at.is_(None),
                    or_(PreviewRow.expires_at.is_(None), PreviewRow.expires_at > now),
                )
            )
            return found is not None

    async def of_sandbox(self, owner: str, sandbox_id: str) -> list[PreviewEntry]:
        """The sandbox's active previews, oldest first."""
        async with self._session() as session:
            rows = await session.scalars(
                select(PreviewRow)
                .where(PreviewRow.owner == owner, PreviewRow.sandbox_id == sandbox_id)
                .order_by(PreviewRow.created_at)
            )
            return [entry for entry in map(_entry, rows) if entry.active()]

    async def revoke(self, owner: str, sandbox_id: str, preview_id: str) -> PreviewEntry | None:
        """Revoke a preview of `owner`'s sandbox; None if it has none by that id."""
        async with self._session.begin() as session:
            row = await session.scalar(
                select(PreviewRow).where(
                    PreviewRow.owner == owner,
                    PreviewRow.sandbox_id == sandbox_id,
                    PreviewRow.id == preview_id,
                )
            )
            if row is None:
                return None
            if row.revoked_at is None:
                await session.execute(
                    update(PreviewRow)
                    .where(PreviewRow.id == preview_id)
                    .values(revoked_at=time.time())
                )
                await session.refresh(row)
            return _entry(row)
