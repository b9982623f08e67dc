"""Per-key limits over a cluster's nodes (`corral.server.cluster.limits`): the front counts a
key's sandboxes on every node (the shared store, real SQLite here) and the creates it has let
through that the store does not show yet, so a key gets no more across the cluster than it may
have, however its sandboxes are spread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.core.errors import CorralError
from corral.core.models import SandboxInfo, StateChange
from corral.core.quota import Quota
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.engine.sealing import KeyRing
from corral.server.cluster.limits import KeyLimits, asked
from corral.server.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "corral.db", KeyRing([bytes(32)]))
    yield opened
    await opened.close()


async def on_node(store: Store, owner: str, number: int, node: str, **spec: object) -> None:
    now = time.time()
    await store.add_sandbox(
        owner,
        SandboxInfo(
            id=f"sb-{number:016x}",
            state=SandboxState.RUNNING,
            runtime="namespaces",
            spec=SandboxSpec(runtime="namespaces", **spec),  # type: ignore[arg-type]
            created_at=now,
            expires_at=now + 300,
            node=node,
            history=(StateChange(SandboxState.RUNNING, now),),
        ),
    )


async def refused(limits: KeyLimits, secret: str, asks: Quota, count: int = 1) -> str:
    with pytest.raises(CorralError) as raised:
        await limits.reserve(f"Bearer {secret}", asks, count)
    assert raised.value.status_code == 429
    assert "across the cluster" in raised.value.message
    return raised.value.code


async def test_a_keys_sandboxes_on_every_node_count(store: Store) -> None:
    key, secret = await store.create_key("spread")
    _, other_secret = await store.create_key("other")
    await on_node(store, key.id, 1, "n0")
    await on_node(store, key.id, 2, "n1")  # each node alone sees one
    limits = KeyLimits(store, per_key=3)
    held = await limits.reserve(f"Bearer {secret}", Quota(), 1)
    # In flight, then made and not yet in the store: it counts all the while.
    assert await refused(limits, secret, Quota()) == "too_many_sandboxes"
    limits.made(held, ["sb-00000000000000ff"])
    assert await refused(limits, secret, Quota()) == "too_many_sandboxes"
    assert await limits.reserve(f"Bearer {other_secret}", Quota(), 3)  # another key's own
    # Once the store has it, it counts once; once it ends, not at all.
    await on_node(store, key.id, 0xFF, "n0")
    assert await refused(limits, secret, Quota()) == "too_many_sandboxes"
    await store.update_sandbox(
        SandboxInfo(
            id="sb-00000000000000ff", state=SandboxState.TERMINATED, runtime="namespaces",
            spec=SandboxSpec(runtime="namespaces"), created_at=0, expires_at=None,
        )
    )  # fmt: skip
    limits.failed(await limits.reserve(f"Bearer {secret}", Quota(), 1))  # a create that failed
    assert await limits.reserve(f"Bearer {secret}", Quota(), 1)  # counts no more


async def test_a_keys_quota_holds_across_the_nodes(store: Store) -> None:
    key, secret = await store.create_key("quota")
    await store.set_quota(key.id, Quota(memory_mb=1024))
    await on_node(store, key.id, 1, "n0", memory_mb=512)
    limits = KeyLimits(store, per_key=100)
    held = await limits.reserve(f"Bearer {secret}", asked({"memory_mb": 256}), 1)
    code = await refused(limits, secret, asked({"memory_mb": 512, "node": "n1"}))
    assert code == "quota_exceeded"
    limits.failed(held)
    assert await limits.reserve(f"Bearer {secret}", asked({"memory_mb": 512}), 1)


async def test_concurrent_creates_cannot_both_pass(store: Store) -> None:
    key, secret = await store.create_key("racing")
    await on_node(store, key.id, 1, "n0")
    limits = KeyLimits(store, per_key=2)
    results = await asyncio.gather(
        *(limits.reserve(f"Bearer {secret}", Quota(), 1) for _ in range(5)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if isinstance(r, list)) == 1
    assert all(isinstance(r, list) or r.code == "too_many_sandboxes" for r in results)  # type: ignore[union-attr]


async def test_a_create_that_fails_while_another_is_checked_counts_no_more(
    store: Store,
) -> None:
    """`failed` takes no lock: a create that fails while another of the key's is being
    checked must not be written back by that check and count for ever."""
    _, secret = await store.create_key("failing")
    limits = KeyLimits(store, per_key=2)
    held = await limits.reserve(f"Bearer {secret}", Quota(), 1)
    quotas = store.quotas

    async def meanwhile() -> dict[str, Quota]:
        limits.failed(held)  # the first create's node refused it just now
        return await quotas()

    store.quotas = meanwhile  # type: ignore[method-assign]
    second = await limits.reserve(f"Bearer {secret}", Quota(), 1)
    store.quotas = quotas  # type: ignore[method-assign]
    assert await limits.reserve(f"Bearer {secret}", Quota(), 1)  # 2 of 2: the failed one is gone
    limits.failed(second)


async def test_a_create_that_fails_while_the_store_is_asked_does_not_count_in_that_check(
    store: Store,
) -> None:
    """A create in flight that fails while a check asks the store about another (made, not
    shown there yet) is not counted by that check: the third create of a key that may have
    two passes."""
    _, secret = await store.create_key("failing-midway")
    limits = KeyLimits(store, per_key=2)
    made = await limits.reserve(f"Bearer {secret}", Quota(), 1)
    limits.made(made, ["sb-00000000000000aa"])  # answered; the store does not show it yet
    in_flight = await limits.reserve(f"Bearer {secret}", Quota(), 1)
    owner = store.owner

    async def meanwhile(sandbox_id: str) -> str | None:
        limits.failed(in_flight)  # its node refused it just now
        return await owner(sandbox_id)

    store.owner = meanwhile  # type: ignore[method-assign]
    third = await limits.reserve(f"Bearer {secret}", Quota(), 1)
    store.owner = owner  # type: ignore[method-assign]
    assert len(third) == 1
    assert await refused(limits, secret, Quota()) == "too_many_sandboxes"  # 2 of 2 now


async def test_a_create_that_fails_while_the_quota_is_read_does_not_count_against_it(
    store: Store,
) -> None:
    key, secret = await store.create_key("failing-quota")
    await store.set_quota(key.id, Quota(memory_mb=1024))
    limits = KeyLimits(store, per_key=100)
    in_flight = await limits.reserve(f"Bearer {secret}", asked({"memory_mb": 512}), 1)
    usage = store.usage

    async def meanwhile(key_id: str, **kwargs: Any) -> Quota:
        limits.failed(in_flight)  # its node refused it just now
        return await usage(key_id, **kwargs)

    store.usage = meanwhile  # type: ignore[method-assign]
    both = await limits.reserve(f"Bearer {secret}", asked({"memory_mb": 512}), 2)
    store.usage = usage  # type: ignore[method-assign]
    assert len(both) == 2  # 1024 of 1024: the failed one's 512 is not counted


async def test_what_a_create_asks_for_and_what_is_not_checked(store: Store) -> None:
    default = SandboxSpec()
    assert asked({}) == Quota(cpu=default.cpu, memory_mb=default.memory_mb, disk_mb=default.disk_mb)
    assert asked({"cpu": 2, "memory_mb": 4096}).memory_mb == 4096
    assert asked({"cpu": "lots"}) == Quota()  # the node refuses it
    limits = KeyLimits(store, per_key=0)
    # No key, or not a valid one: nothing counted here; the node answers 401.
    for header in (None, "", "Bearer corral_unknown", "Basic abc"):
        assert await limits.reserve(header, Quota(), 1) == []
