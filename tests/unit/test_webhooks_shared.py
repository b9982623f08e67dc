"""Webhooks shared by servers on one store (a cluster's nodes and front): what one registers or
removes, the others take up, and only then send to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.core.errors import NotFound
from corral.engine.sealing import KeyRing
from corral.images.oci.egress import Egress
from corral.server.store import Store
from corral.server.webhooks import Webhooks


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[Webhooks, Webhooks]]:
    """Two servers' webhooks on one store (the receiver's host allowed by name)."""
    store = await Store.open(tmp_path / "corral.db", KeyRing([bytes(32)]))
    egress = Egress.of(("localhost",))
    servers = (Webhooks(store.webhooks, None, egress), Webhooks(store.webhooks, None, egress))
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.close()
    await store.close()


async def test_a_webhook_added_on_one_server_is_taken_up_by_the_other(
    two: tuple[Webhooks, Webhooks],
) -> None:
    first, second = two
    hook, _ = await first.add("key-a", "http://localhost:9/hook", None)
    assert [h.id for h in await second.of("key-a")] == [hook.id]
    assert await second.of("key-b") == []
    second.publish("key-a", {"type": "sandbox.state", "sandbox_id": "sb-1"})
    assert second._queues[hook.id].qsize() == 1  # queued for sending by the second
    await second.remove("key-a", hook.id)
    await first.sync()
    assert await first.of("key-a") == []
    assert hook.id not in first._senders  # the first stopped sending to it
    with pytest.raises(NotFound):
        await first.remove("key-a", hook.id)
