"""Each key's default egress rules: what its internet sandboxes get when a create gives none.

An admin sets them (`PUT /v1/keys/{key}/network`, `corral keys network`); a sandbox's own rules,
given at create or later, replace them, and the operator's floor holds over both.
"""

from __future__ import annotations

import json

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.core.egress import EgressPolicy
from corral.server.tables import KeyNetworkRow, insert_into


class KeyNetworks:
    """The `key_networks` table."""

    def __init__(self, session: async_sessionmaker[AsyncSession]) -> None:
        self._session = session

    async def all(self) -> dict[str, EgressPolicy]:
        """Every key's default rules that are set, by key id."""
        async with self._session() as session:
            rows = await session.scalars(select(KeyNetworkRow))
            return {row.key_id: EgressPolicy.parse(json.loads(row.rules)) for row in rows}

    async def set(self, key_id: str, rules: EgressPolicy | None) -> None:
        """Set (None: drop) the default rules of key `key_id`."""
        async with self._session.begin() as session:
            if rules is None:
                await session.execute(delete(KeyNetworkRow).where(KeyNetworkRow.key_id == key_id))
                return
            values = {"key_id": key_id, "rules": json.dumps(rules.to_dict())}
            upsert = insert_into(session, KeyNetworkRow).values(values)
            await session.execute(
                upsert.on_conflict_do_update(
                    index_elements=["key_id"], set_={"rules": values["rules"]}
                )
            )
