"""The service's reconciliation of its catalogue with what the engine re-adopted."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from corral.core.models import SandboxInfo, StateChange
from corral.core.spec import SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.server.config import ServerConfig
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
    directory = data_dir.with_name(data_dir.name + "-moved-on")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o711)
    (data_dir / "images").mkdir(exist_ok=True)
    (directory / "images").symlink_to(data_dir / "images")
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
