"""The service's reconciliation of its catalogue with what the engine re-adopted."""

from __future__ import annotations

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
