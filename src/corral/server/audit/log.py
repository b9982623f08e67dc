"""The `audit` table: entries queued by the request path and written by one task, in batches,
in the order they were made; queried by key, sandbox, operation and time; pruned past the
retention the operator chose (`corral serve --audit-retention DAYS`, 0 turns the log off).

Nothing waits on the database to answer a request, and requests share transactions: the
writer lingers `LINGER` after an entry for the ones that follow. The queue holds at most
`QUEUED` entries: a store too slow to keep up loses the newest ones, counted in
`corral_audit_dropped_total` and logged, rather than holding up the API or growing without
bound. Closing the server writes what is queued first. Each entry's detail (command lines and
code can hold secrets) is sealed with the node's at-rest key, like sandboxes' environments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from sqlalchemy import String, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.core.audit import AuditEntry
from corral.engine.sealing import KeyRing
from corral.server.metrics import AUDIT_DROPPED
from corral.server.tables import AuditRow

log = logging.getLogger("corral.audit")

QUEUED = 20_000
BATCH = 500
LINGER = 0.05  # seconds the writer waits after an entry for more to share its transaction
MAX_PAGE = 1000
PRUNE_BATCH = 5000  # rows per delete: a long prune never holds the database for long


# Each bounded text column's length. PostgreSQL refuses a longer value, and with it the whole
# batch: a tenant's code raising an error with a long name must not erase others' entries.
LIMITS = {
    column.name: column.type.length
    for column in AuditRow.__table__.columns
    if isinstance(column.type, String) and column.type.length
}


def _fitted(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        name: value[: LIMITS[name]] if isinstance(value, str) and name in LIMITS else value
        for name, value in entry.items()
    }


class AuditLog:
    """The audit log of one server."""

    def __init__(self, retention: float) -> None:
        self.retention = retention  # seconds; 0: nothing recorded
        self._session: async_sessionmaker[AsyncSession] | None = None
        self._keys: KeyRing | None = None
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUED)
        self._writer: asyncio.Task[None] | None = None
        self._queued = 0  # entries queued so far, and of those, written (or dropped) so far
        self._settled = 0
        self._progress = asyncio.Condition()

    @property
    def enabled(self) -> bool:
        return self.retention > 0

    async def start(self, session: async_sessionmaker[AsyncSession], keys: KeyRing) -> None:
        self._session = session
        self._keys = keys
        if self.enabled:
            self._writer = asyncio.create_task(self._write_loop())

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._writer is None:
            return
        await self.flushed()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None

    def add(self, entry: dict[str, Any]) -> None:
        """Queue one entry (the columns of `AuditEntry` but its id), its text cut to fit."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(_fitted(entry))
            self._queued += 1
        except asyncio.QueueFull:
            AUDIT_DROPPED.inc()
            log.warning("audit log queue full: an entry of %s was dropped", entry["operation"])

    async def flushed(self) -> None:
        """Wait until the entries queued before now are written (not those queued after)."""
        if self._writer is None:
            return
        target = self._queued
        async with self._progress:
            await self._progress.wait_for(lambda: self._settled >= target)

    async def _write_loop(self) -> None:
        assert self._session is not None and self._keys is not None
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < BATCH:  # one commit per request would cost each ~1 ms
                await asyncio.sleep(LINGER)
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                rows = [{**entry, "detail": self._seal(entry["detail"])} for entry in batch]
                async with self._session.begin() as session:
                    await session.execute(insert(AuditRow), rows)
            except Exception:
                AUDIT_DROPPED.inc(len(batch))
                log.exception("could not write %d audit entries", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
                async with self._progress:
                    self._settled += len(batch)
                    self._progress.notify_all()

    def _seal(self, detail: dict[str, Any]) -> str:
        assert self._keys is not None
        return self._keys.seal_text(json.dumps(detail), "audit")

    async def query(
        self,
        *,
        key_id: str | None = None,
        sandbox_id: str | None = None,
        operation: str | None = None,
        operations: tuple[str, ...] = (),
        since: float | None = None,
        until: float | None = None,
        cursor: int | None = None,
        newest_first: bool = False,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Entries matching every filter given (`operations`: any of them), by id (the order
        they were written); `cursor` is the last id of the previous page."""
        assert self._session is not None
        await self.flushed()
        query = select(AuditRow)
        for column, value in (
            (AuditRow.key_id, key_id),
            (AuditRow.sandbox_id, sandbox_id),
            (AuditRow.operation, operation),
        ):
            if value is not None:
                query = query.where(column == value)
        if operations:
            query = query.where(AuditRow.operation.in_(operations))
        if since is not None:
            query = query.where(AuditRow.at >= since)
        if until is not None:
            query = query.where(AuditRow.at < until)
        if cursor is not None:
            query = query.where(AuditRow.id < cursor if newest_first else AuditRow.id > cursor)
        order = AuditRow.id.desc() if newest_first else AuditRow.id.asc()
        async with self._session() as session:
            rows = await session.scalars(query.order_by(order).limit(min(limit, MAX_PAGE)))
            return [self._entry(row) for row in rows]

    async def prune(self, now: float | None = None) -> int:
        """Forget entries older than the retention; how many."""
        if not self.enabled or self._session is None:
            return 0
        before = (now or time.time()) - self.retention
        old = select(AuditRow.id).where(AuditRow.at < before).limit(PRUNE_BATCH)
        forgotten = 0
        while True:
            async with self._session.begin() as session:
                done = await session.execute(delete(AuditRow).where(AuditRow.id.in_(old)))
            count = int(getattr(done, "rowcount", 0) or 0)
            forgotten += count
            if count < PRUNE_BATCH:
                return forgotten

    def _entry(self, row: AuditRow) -> AuditEntry:
        assert self._keys is not None
        return AuditEntry(
            id=row.id, at=row.at, key_id=row.key_id, client=row.client,
            request_id=row.request_id, operation=row.operation, sandbox_id=row.sandbox_id,
            status=row.status, exit_code=row.exit_code, error=row.error,
            bytes_in=row.bytes_in, bytes_out=row.bytes_out, duration=row.duration,
            detail=json.loads(self._keys.open_text(row.detail, "audit")),
        )  # fmt: skip
