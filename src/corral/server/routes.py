"""HTTP routes for sandboxes, their processes and API keys (files: `server.files`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse

from corral.errors import InvalidRequest, SandboxNotFound
from corral.pools import POOL_FIELDS
from corral.process import Process
from corral.server.auth import AdminKey, Key, ServiceDep
from corral.server.schemas import (
    CommandOut,
    CreateKey,
    CreateSandbox,
    Exec,
    Fork,
    KeyOut,
    PoolBody,
    PoolOut,
    ProcessOut,
    RunCommand,
    SandboxOut,
    SetTimeout,
    Signal,
    SnapshotOut,
    TakeSnapshot,
)
from corral.server.service import Service
from corral.spec import SandboxSpec

router = APIRouter(prefix="/v1")
EVENT_KEEPALIVE = 15.0  # seconds between comments on a quiet event stream


@router.post("/sandboxes", status_code=201, tags=["sandboxes"])
async def create_sandbox(body: CreateSandbox, key: Key, service: ServiceDep) -> SandboxOut:
    """Create a sandbox and return once it can run commands."""
    fields = body.model_dump()
    pool, snapshot = fields.pop("pool"), fields.pop("snapshot")
    from_snapshot = (*POOL_FIELDS, "volumes")
    fixed = sorted(body.model_fields_set & set(from_snapshot))
    if snapshot is not None and fixed:
        raise InvalidRequest(
            f"a sandbox from a snapshot has the snapshot's {', '.join(from_snapshot)}; "
            f"leave out {', '.join(fixed)}"
        )
    spec = SandboxSpec.from_dict(fields)
    return SandboxOut.of(await service.create(key, spec, pool=pool, snapshot=snapshot))


@router.get("/sandboxes", tags=["sandboxes"])
async def list_sandboxes(
    key: Key,
    service: ServiceDep,
    state: str | None = None,
    metadata: Annotated[
        list[str], Query(description="key=value; repeat to match several (all must match)")
    ] = [],  # noqa: B006 - FastAPI copies defaults
) -> list[SandboxOut]:
    """Your sandboxes, oldest first; ended ones stay listed for 7 days."""
    wanted = {}
    for item in metadata:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidRequest(f"metadata filter {item!r} must read key=value")
        wanted[name] = value
    return [SandboxOut.of(info) for info in await service.list(key, state, wanted)]


@router.get("/sandboxes/{sandbox_id}", tags=["sandboxes"])
async def get_sandbox(sandbox_id: str, key: Key, service: ServiceDep) -> SandboxOut:
    """A sandbox's state, spec (environment values withheld) and, once ended, why."""
    return SandboxOut.of(await service.info(key, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", tags=["sandboxes"])
async def terminate_sandbox(sandbox_id: str, key: Key, service: ServiceDep) -> SandboxOut:
    """End a sandbox now. Terminating an ended sandbox returns it unchanged."""
    await service.owned(key, sandbox_id)
    with contextlib.suppress(SandboxNotFound):  # ended long ago: only the store knows it
        await service.engine.terminate(sandbox_id)
    return SandboxOut.of(await service.info(key, sandbox_id))


@router.post("/sandboxes/{sandbox_id}/timeout", tags=["sandboxes"])
async def set_timeout(
    sandbox_id: str, body: SetTimeout, key: Key, service: ServiceDep
) -> SandboxOut:
    """Make the sandbox end `timeout` seconds from now (extend or shorten; at most 24 h)."""
    await service.owned(key, sandbox_id)
    return SandboxOut.of(await service.engine.set_timeout(sandbox_id, body.timeout))


@router.post("/sandboxes/{sandbox_id}/pause", tags=["sandboxes"])
async def pause(sandbox_id: str, key: Key, service: ServiceDep) -> SandboxOut:
    """Freeze every process (memory kept, no CPU used); the lifetime stops too."""
    await service.owned(key, sandbox_id)
    return SandboxOut.of(await service.engine.pause(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/resume", tags=["sandboxes"])
async def resume(sandbox_id: str, key: Key, service: ServiceDep) -> SandboxOut:
    """Thaw a paused sandbox."""
    await service.owned(key, sandbox_id)
    return SandboxOut.of(await service.engine.resume(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/snapshot", status_code=201, tags=["snapshots"])
async def take_snapshot(
    sandbox_id: str, body: TakeSnapshot, key: Key, service: ServiceDep
) -> SnapshotOut:
    """Save memory and files (gvisor); the sandbox goes on. New sandboxes start from it."""
    return SnapshotOut.of(await service.snapshot(key, sandbox_id, body.name, body.ttl))


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, tags=["snapshots"])
async def fork(sandbox_id: str, body: Fork, key: Key, service: ServiceDep) -> list[SandboxOut]:
    """`count` new sandboxes with this one's memory and files, diverging from now on."""
    return [SandboxOut.of(info) for info in await service.fork(key, sandbox_id, body.count)]


@router.get("/snapshots", tags=["snapshots"])
async def list_snapshots(key: Key, service: ServiceDep) -> list[SnapshotOut]:
    """Your snapshots, oldest first."""
    return [SnapshotOut.of(info) for info in service.snapshots_of(key)]


@router.get("/snapshots/{ref}", tags=["snapshots"])
async def get_snapshot(ref: str, key: Key, service: ServiceDep) -> SnapshotOut:
    return SnapshotOut.of(service.snapshot_for(key, ref))


@router.delete("/snapshots/{ref}", status_code=204, tags=["snapshots"])
async def delete_snapshot(ref: str, key: Key, service: ServiceDep) -> Response:
    """Delete a snapshot (sandboxes started from it are not affected)."""
    await service.delete_snapshot(key, ref)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/hibernate", tags=["sandboxes"])
async def hibernate(sandbox_id: str, key: Key, service: ServiceDep) -> SandboxOut:
    """Write memory and files to disk and stop (gvisor): no memory, no CPU, no lifetime used."""
    await service.owned(key, sandbox_id)
    return SandboxOut.of(await service.engine.hibernate(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/wake", tags=["sandboxes"])
async def wake(sandbox_id: str, key: Key, service: ServiceDep) -> SandboxOut:
    """Restore a hibernated sandbox exactly where it was."""
    await service.owned(key, sandbox_id)
    return SandboxOut.of(await service.engine.wake(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/exec", tags=["processes"])
async def run_command(
    sandbox_id: str, body: RunCommand, key: Key, service: ServiceDep
) -> CommandOut:
    """Run a command to completion and return its exit code and output.

    Each output stream keeps its first 8 MiB (`truncated` says when more was dropped); stream
    bigger output over the exec WebSocket instead. A command past `timeout` is killed and the
    result says `timed_out`.
    """
    await service.owned(key, sandbox_id)
    process = await start(service, sandbox_id, body, stdin=body.stdin is not None)
    if body.stdin is not None:
        await process.write_stdin(body.stdin)
        await process.close_stdin()
    limit = service.config.max_output_bytes
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = False
    with service.engine.active(sandbox_id):  # its client waits: the sandbox is in use
        async for name, data in process.output():
            buffer = kept[name]
            room = limit - len(buffer)
            if len(data) > room:
                truncated = True  # keep draining, so the process is never blocked on output
            buffer += data[: max(room, 0)]
        result = await process.wait()
    result = dataclasses.replace(result, stdout=bytes(kept["stdout"]), stderr=bytes(kept["stderr"]))
    return CommandOut.of(result, truncated)


async def start(
    service: Service,
    sandbox_id: str,
    body: Exec,
    *,
    stdin: bool = False,
    pty: tuple[int, int] | None = None,
) -> Process:
    """Start the command a request describes (shared by the plain and streaming exec)."""
    return await service.engine.exec(
        sandbox_id,
        body.argv,
        cmd=body.cmd,
        env=body.env,
        cwd=body.cwd,
        user=body.user,
        stdin=stdin,
        pty=pty,
        timeout=body.timeout,
        tag=body.tag,
    )


@router.get("/sandboxes/{sandbox_id}/processes", tags=["processes"])
async def list_processes(sandbox_id: str, key: Key, service: ServiceDep) -> list[ProcessOut]:
    """Processes started in the sandbox, running and recently ended."""
    await service.owned(key, sandbox_id)
    return [ProcessOut.of(p) for p in await service.engine.processes(sandbox_id)]


@router.post("/sandboxes/{sandbox_id}/processes/{process_id}/signal", tags=["processes"])
async def signal_process(
    sandbox_id: str, process_id: int, body: Signal, key: Key, service: ServiceDep
) -> Response:
    """Send a signal (default SIGTERM) to a process and its process group."""
    await service.owned(key, sandbox_id)
    await service.engine.signal(sandbox_id, process_id, body.signal)
    return Response(status_code=204)


@router.get("/pools", tags=["pools"])
async def list_pools(key: Key, service: ServiceDep) -> list[PoolOut]:
    """Warm pools: template, target size, idle sandboxes, hits and misses."""
    return [PoolOut(**pool) for pool in service.engine.list_pools()]


@router.put("/pools/{name}", tags=["pools"])
async def set_pool(name: str, body: PoolBody, key: AdminKey, service: ServiceDep) -> PoolOut:
    """Create or resize a pool; creates whose spec matches its template claim from it."""
    fields = body.model_dump()
    size = fields.pop("size")
    return PoolOut(**service.engine.configure_pool(name, SandboxSpec(**fields), size))


@router.delete("/pools/{name}", status_code=204, tags=["pools"])
async def remove_pool(name: str, key: AdminKey, service: ServiceDep) -> Response:
    """Remove a pool and end its idle sandboxes."""
    service.engine.remove_pool(name)
    return Response(status_code=204)


@router.get("/keys", tags=["keys"])
async def list_keys(key: AdminKey, service: ServiceDep) -> list[KeyOut]:
    """Every API key (never their secrets). Admin keys only."""
    return [KeyOut.of(k) for k in await service.db.list_keys()]


@router.post("/keys", status_code=201, tags=["keys"])
async def create_key(body: CreateKey, key: AdminKey, service: ServiceDep) -> KeyOut:
    """A new API key; its secret is in this response only. Admin keys only."""
    made, secret = await service.db.create_key(body.name, admin=body.admin)
    return KeyOut.of(made, secret)


@router.delete("/keys/{key_id}", tags=["keys"])
async def revoke_key(key_id: str, key: AdminKey, service: ServiceDep) -> KeyOut:
    """Revoke a key: it stops working at once; its sandboxes run until they end."""
    return KeyOut.of(await service.db.revoke_key(key_id))


@router.get("/events", tags=["events"], response_class=StreamingResponse)
async def events(key: Key, service: ServiceDep, sandbox_id: str | None = None) -> StreamingResponse:
    """Server-sent events: every state change of your sandboxes (or of one), as it happens."""
    if sandbox_id is not None:
        await service.owned(key, sandbox_id)

    async def stream() -> AsyncIterator[bytes]:
        with service.subscribe(key) as queue:
            yield b": connected\n\n"
            number = 0
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), EVENT_KEEPALIVE)
                except TimeoutError:
                    yield b": keepalive\n\n"  # proxies keep the connection; clients ignore it
                    continue
                if sandbox_id is not None and event.get("sandbox_id") not in (None, sandbox_id):
                    continue
                number += 1
                data = json.dumps(event)
                yield f"id: {number}\nevent: {event['type']}\ndata: {data}\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream")
