"""Which key uploaded which content (`PUT /v1/blobs/{digest}`): the files themselves are
shared by digest in the layer store; a key may use only content it sent."""

from __future__ import annotations

import time
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.server.tables import BlobRow, insert_into


class BlobStore:
    """The `blobs` table."""

    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    async def add(self, owner: str, digest: str, size: int) -> None:
        """Record that `owner` uploaded the content `digest`."""
        async with self._session.begin() as session:
            row = {"owner": owner, "digest": digest, "size": size, "created_at": time.time()}
            await session.execute(
                insert_into(session, BlobRow).values(**row).on_conflict_do_nothing()
            )

    async def of(self, owner: str, digests: Iterable[str]) -> set[str]:
        """Which of `digests` `owner` has uploaded."""
        wanted = set(digests)
        async with self._session() as session:
            query = select(BlobRow.digest).where(BlobRow.owner == owner, BlobRow.digest.in_(wanted))
            return set(await session.scalars(query))
