"""The service's reconciliation of its catalogue with what the engine re-adopted."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from corral.core.errors import CorralError
from corral.core.models import SandboxInfo, StateChange
from corral.core.spec import SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.engine import moving
from corral.server import service as service_module
from corral.server.config import SQLITE, ServerConfig
from corral.server.resources.sandboxes import Sandboxes
from corral.server.service import Service
from corral.server.store import Store
from corral.server.tenancy import Tenant
from tests.conftest import require_runtime


async def test_a_sandbox_gone_across_a_restart_is_marked_ended(data_dir: Path) -> None:
    config = ServerConfig(data_dir=data_dir.with_name(data_dir.name + "-service"))
    config.database.parent.mkdir(parents=True, exist_ok=True)
    config.database.unlink(missing_ok=True)
    store = await Store.open(config.database, config.key_ring())
    key, _ = await store.create_key("owner")
    now = time.time()
    vanished = SandboxInfo(
        id="sb-0000000000000001",
        state=SandboxState.RUNNING,
        runtime="namespaces",
        spec=SandboxSpec(runtime="namespaces"),
        created_at=now,
        expires_at=now + 300,
        history=(StateChange(SandboxState.RUNNING, now),),
    )
    await store.add_sandbox(key.id, vanished)
    await store.close()

    service = Service(config)
    await service.start()
    try:
        info = await Sandboxes(Tenant(service, key)).info(vanished.id)
    finally:
        await service.close()
    assert info.state is SandboxState.TERMINATED
    assert info.end_reason is EndReason.RUNTIME_ERROR
    assert info.end_detail and "restarted" in info.end_detail


async def test_a_cluster_node_forgets_a_sandbox_that_moved_on_while_it_was_down(
    data_dir: Path,
) -> None:
    """A node that stopped between a move and forgetting the sandbox finds, at its next
    start, that the store has it on another node: it drops its stale copy instead of taking
    the sandbox back. A server on its own (not a cluster's node) keeps what it has."""
    require_runtime("gvisor")
    directory = _fresh_dir(data_dir, "-moved-on")
    alone = ServerConfig(data_dir=directory, node_name="a", host_scope=6)
    node = dataclasses.replace(alone, front_key_id="k-front")
    service = Service(alone)
    await service.start()
    try:
        key, _ = await service.store.create_key("owner")
        made = await service.engine.create(SandboxSpec(runtime="gvisor"))
        service.own(key.id, made)
        await service.engine.hibernate(made.id)
        await service.recorded()
    finally:
        await service.close()
    for config, kept in ((alone, True), (node, False)):
        store = await Store.open(config.database, config.key_ring())
        found = await store.get_sandbox(made.id)
        assert found is not None
        await store.update_sandbox(dataclasses.replace(found[1], node="b"))  # as if moved
        await store.close()
        service = Service(config)
        await service.start()
        try:
            here = service.engine.registry.find(made.id)
            row = await service.store.get_sandbox(made.id)
            assert row is not None
            assert (here is not None, row[1].node) == ((True, "a") if kept else (False, "b"))
            assert row[1].state is SandboxState.HIBERNATED
            assert (directory / "sandboxes" / made.id).exists() is kept
        finally:
            await service.close()
    shutil.rmtree(directory, ignore_errors=True)


async def test_a_cluster_node_leaves_other_nodes_sandboxes_and_ends_what_the_cluster_ended(
    data_dir: Path,
) -> None:
    """At its start, a cluster's node neither ends another node's live sandboxes in the shared
    store (they run there) nor takes back one of its own that the front ended while it was
    away (`node_lost`): it ends that copy, and the store keeps why."""
    require_runtime("namespaces")
    directory = _fresh_dir(data_dir, "-node-start")
    config = ServerConfig(data_dir=directory, node_name="a", host_scope=6, front_key_id="k")
    service = Service(config)
    await service.start()
    try:
        key, _ = await service.store.create_key("owner")
        made = await service.engine.create(SandboxSpec(runtime="namespaces"))
        service.own(key.id, made)
        await service.recorded()
    finally:
        await service.close()
    store = await Store.open(config.database, config.key_ring())
    found = await store.get_sandbox(made.id)
    assert found is not None
    now = time.time()
    lost = dataclasses.replace(
        found[1], state=SandboxState.TERMINATED, ended_at=now, end_reason=EndReason.NODE_LOST,
        end_detail="node a was lost", expires_at=None,
    )  # fmt: skip
    await store.update_sandbox(lost)
    elsewhere = dataclasses.replace(found[1], id="sb-0000000000000002", node="b")
    await store.add_sandbox(key.id, elsewhere)
    await store.close()
    service = Service(config)
    await service.start()
    try:
        assert service.engine.get(made.id).state is SandboxState.TERMINATED
        ended = await service.store.get_sandbox(made.id)
        other = await service.store.get_sandbox(elsewhere.id)
        assert ended is not None and other is not None
        assert (ended[1].state, ended[1].end_reason) == (
            SandboxState.TERMINATED, EndReason.NODE_LOST
        )  # fmt: skip
        assert other[1].state is SandboxState.RUNNING
    finally:
        await service.close()
    shutil.rmtree(directory, ignore_errors=True)


async def test_a_move_the_front_left_unfinished_is_settled_by_the_store(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose sandbox was handed off and never taken back nor forgotten (the front
    stopped mid-move) settles it once the move is overdue: it stays, hibernated, while the
    store names this node; it is forgotten once the store names another (it was taken in)."""
    require_runtime("gvisor")
    monkeypatch.setattr(moving, "LEAVE_TIMEOUT", 0.0)
    directory = _fresh_dir(data_dir, "-unfinished")
    config = ServerConfig(data_dir=directory, node_name="a", host_scope=6, front_key_id="k")
    service = Service(config)
    await service.start()
    try:
        key, _ = await service.store.create_key("owner")
        made = await service.engine.create(SandboxSpec(runtime="gvisor"))
        service.own(key.id, made)
        record = service.engine.registry.get(made.id)
        await service.engine.moving.hand_off(made.id, "b")
        await _until(lambda: record.leaving is None, "the move is settled")
        assert service.engine.get(made.id).state is SandboxState.HIBERNATED  # it stayed
        await service.engine.moving.hand_off(made.id, "b")
        await service.recorded()
        found = await service.store.get_sandbox(made.id)
        assert found is not None
        await service.store.update_sandbox(dataclasses.replace(found[1], node="b"))
        await _until(lambda: service.engine.registry.find(made.id) is None, "it is forgotten")
        assert not (directory / "sandboxes" / made.id).exists()
    finally:
        await service.close()
    shutil.rmtree(directory, ignore_errors=True)


async def _until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.2)


async def test_a_create_is_answered_once_a_shared_store_has_it(data_dir: Path) -> None:
    """Where other servers read the store (a cluster's fronts find a sandbox's node there), a
    create or fork is answered once the store has it."""
    require_runtime("gvisor")  # forks are of memory
    async with _sharing_a_store(data_dir) as (service, sandboxes):
        # Read as another server would, at once (nothing awaited since the answer).
        def stored(sandbox_id: str) -> bool:
            with contextlib.closing(sqlite3.connect(service.config.database)) as other:
                row = other.execute("SELECT 1 FROM sandboxes WHERE id = ?", (sandbox_id,))
                return row.fetchone() is not None

        made = await sandboxes.create(SandboxSpec(runtime="gvisor"), pool=False)
        assert stored(made.id)
        forked = await sandboxes.fork(made.id, 1)
        assert [stored(info.id) for info in forked] == [True]


@contextlib.asynccontextmanager
async def _sharing_a_store(data_dir: Path) -> AsyncIterator[tuple[Service, Sandboxes]]:
    """A started service whose store other servers would read (`--database-url`), and a
    tenant's sandboxes there; whatever it started ends with the block."""
    directory = _fresh_dir(data_dir, "-shared-store")
    config = ServerConfig(data_dir=directory, database_url=f"{SQLITE}{directory}/shared.db")
    service = Service(config)
    await service.start()
    try:
        key, _ = await service.store.create_key("owner")
        yield service, Sandboxes(Tenant(service, key))
    finally:
        await _end_all(service)
        await service.close()
    shutil.rmtree(directory, ignore_errors=True)


def _fresh_dir(data_dir: Path, suffix: str) -> Path:
    """An empty data directory beside `data_dir` that shares its built images."""
    directory = data_dir.with_name(data_dir.name + suffix)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o711)
    (data_dir / "images").mkdir(exist_ok=True)
    (directory / "images").symlink_to(data_dir / "images")
    return directory


async def test_the_store_has_a_new_sandbox_after_its_first_requests_not_before_them(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create is answered with its catalogue write still queued: the write lingers
    (`WRITE_LINGER`), so the requests that follow a create (its first command) do not wait for
    it. Anything that reads the store waits for it: a list, the record of one just ended."""
    require_runtime("namespaces")
    monkeypatch.setattr(service_module, "WRITE_LINGER", 1.0, raising=False)  # to see it
    config = ServerConfig(data_dir=_fresh_dir(data_dir, "-linger"))
    service = Service(config)
    await service.start()
    try:
        key, _ = await service.store.create_key("owner")
        sandboxes = Sandboxes(Tenant(service, key))
        made = await sandboxes.create(SandboxSpec(runtime="namespaces"), pool=False)
        await asyncio.sleep(0.1)
        assert await service.store.get_sandbox(made.id) is None  # not yet: lingering
        assert [s.id for s in await sandboxes.list(None, {})] == [made.id]  # waits for it
        assert await service.store.get_sandbox(made.id) is not None
        await service.engine.terminate(made.id)
        service.engine.registry.discard(made.id)  # as once `ENDED_KEPT` newer ones have ended
        ended = await sandboxes.info(made.id)  # from the store, once it has the end
        assert ended.state is SandboxState.TERMINATED
        await asyncio.sleep(1.5)  # lingered, then written without anyone waiting
        stored = await service.store.get_sandbox(made.id)
        assert stored is not None and stored[1].state is SandboxState.TERMINATED
    finally:
        await _end_all(service)
        await service.close()
    shutil.rmtree(config.data_dir, ignore_errors=True)


async def test_a_store_other_servers_read_is_written_without_lingering(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store named by --database-url (servers on one machine, or a cluster's) is read by
    other servers, which cannot ask this one to write: its changes are not held back."""
    require_runtime("namespaces")
    monkeypatch.setattr(service_module, "WRITE_LINGER", 30.0)
    async with _sharing_a_store(data_dir) as (service, sandboxes):
        made = await sandboxes.create(SandboxSpec(runtime="namespaces"))
        for _ in range(100):  # well before the 30 s a linger would take
            if await service.store.get_sandbox(made.id) is not None:
                break
            await asyncio.sleep(0.05)
        assert await service.store.get_sandbox(made.id) is not None


async def _end_all(service: Service) -> None:
    """End what a test started, even when it failed half-way: `Service.close` keeps sandboxes
    running for the next server, and no later test may find them."""
    for record in list(service.engine.registry):
        if record.alive:
            with contextlib.suppress(CorralError):
                await service.engine.terminate(record.id)
