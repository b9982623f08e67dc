"""Deployments in the store: who owns each, its current version, and the sandbox serving it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.core.errors import Conflict
from corral.server.deployments.spec import DeploymentSpec
from corral.server.tables import DeploymentRow


@dataclasses.dataclass(frozen=True)
class DeploymentEntry:
    id: str
    owner: str
    spec: DeploymentSpec
    version: int
    created_at: float
    updated_at: float
    instance: str | None = None  # the sandbox serving it
    pid: int | None = None  # its command's process in that sandbox

    @property
    def name(self) -> str:
        return self.spec.name


def _entry(row: DeploymentRow) -> DeploymentEntry:
    return DeploymentEntry(
        id=row.id,
        owner=row.owner,
        spec=DeploymentSpec.from_dict(json.loads(row.spec)),
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        instance=row.instance,
        pid=row.pid,
    )


class DeploymentStore:
    """The `deployments` table."""

    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    async def add(self, entry: DeploymentEntry) -> None:
        """Record a new deployment; `Conflict` if its name is taken (by anyone: it is a URL)."""
        try:
            async with self._session.begin() as session:
                session.add(
                    DeploymentRow(
                        id=entry.id,
                        owner=entry.owner,
                        name=entry.name,
                        created_at=entry.created_at,
                        **_changing(entry),
                    )
                )
        except IntegrityError:
            raise name_taken(entry.name) from None

    async def save(self, entry: DeploymentEntry) -> None:
        """Record a new version, or another sandbox serving it."""
        async with self._session.begin() as session:
            await session.execute(
                update(DeploymentRow).where(DeploymentRow.id == entry.id).values(**_changing(entry))
            )

    async def all(self) -> list[DeploymentEntry]:
        async with self._session() as session:
            rows = await session.scalars(select(DeploymentRow).order_by(DeploymentRow.created_at))
            return [_entry(row) for row in rows]

    async def remove(self, deployment_id: str) -> None:
        async with self._session.begin() as session:
            await session.execute(delete(DeploymentRow).where(DeploymentRow.id == deployment_id))


def _changing(entry: DeploymentEntry) -> dict[str, Any]:
    """The columns a new version or instance changes."""
    return {
        "spec": json.dumps(entry.spec.to_dict()),
        "version": entry.version,
        "instance": entry.instance,
        "pid": entry.pid,
        "updated_at": entry.updated_at,
    }


def name_taken(name: str) -> Conflict:
    return Conflict(
        f"the deployment name {name!r} is taken on this server (names are URLs); pick another",
        code="name_taken",
    )
