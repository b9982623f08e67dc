"""Warm pools through the server, and how the server behaves under a burst it must refuse."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import corral
from corral import AsyncSandbox, Sandbox
from tests.conftest import leftovers, require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server


def test_pools_through_the_api_and_cli(data_dir: Path) -> None:
    require_runtime("namespaces")
    server = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-pools"),
        data_dir / "images",
        "--pool",
        "namespaces:default:2",
    )
    try:
        with server.client() as sdk:
            _wait_idle(sdk, "namespaces-debian", 2)
            sandbox = Sandbox.create(runtime="namespaces", metadata={"via": "pool"}, client=sdk)
            pool = sdk.list_pools()[0]
            assert (pool["hits"], pool["misses"]) == (1, 0)
            assert sandbox.run("echo warm").stdout == "warm\n"
            assert [info.id for info in Sandbox.list(client=sdk)] == [sandbox.id]
            cold = Sandbox.create(runtime="namespaces", pool=False, client=sdk)
            assert sdk.list_pools()[0]["hits"] == 1
            for made in (sandbox, cold):
                made.terminate()
            for _ in range(5):  # answered before the store has it, ended at once: still found
                quick = Sandbox.create(runtime="namespaces", client=sdk)
                assert quick.terminate().state is corral.SandboxState.TERMINATED
                assert quick.id in {info.id for info in Sandbox.list(client=sdk)}

            env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key}
            listed = subprocess.run(
                [sys.executable, "-m", "corral", "pools", "list", "--json"],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            assert json.loads(listed.stdout)[0]["name"] == "namespaces-debian"

            assert sdk.set_pool("namespaces-debian", 0, runtime="namespaces")["size"] == 0
            with pytest.raises(corral.InvalidRequest):
                sdk.set_pool("big", 1, memory_mb=1)
            with pytest.raises(corral.InvalidRequest):
                sdk.set_pool("Bad Name", 1)
            with server.client(server.new_key("plain")) as plain:
                assert plain.list_pools()[0]["name"] == "namespaces-debian"
                with pytest.raises(corral.PermissionDenied):
                    plain.set_pool("mine", 1)
            sdk.remove_pool("namespaces-debian")
            with pytest.raises(corral.NotFound) as caught:
                sdk.remove_pool("namespaces-debian")
            assert caught.value.code == "pool_not_found"
    finally:
        server.stop_and_clean()


def _wait_idle(sdk: corral.Client, name: str, idle: int) -> None:
    for _ in range(600):  # hang bound only
        if next(p for p in sdk.list_pools() if p["name"] == name)["idle"] == idle:
            return
        time.sleep(0.05)
    raise AssertionError(f"pool {name} never reached {idle} idle: {sdk.list_pools()}")


def _fd_targets(server: Server) -> list[str]:
    """What the server's open descriptors are, less the database's: SQLAlchemy's pool keeps up
    to 15 connections open on purpose, as many as the busiest moment needed."""
    assert server.process is not None
    database = str(server.data_dir / "corral.db")
    seen = []
    for fd in Path(f"/proc/{server.process.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            seen.append(os.readlink(fd))
    return sorted(target for target in seen if not target.startswith(database))


def _fds(server: Server) -> int:
    return len(_fd_targets(server))


def test_a_burst_past_the_limits_is_refused_at_once_and_leaks_nothing(data_dir: Path) -> None:
    require_runtime("namespaces")
    server = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-load"),
        data_dir / "images",
        "--max-sandboxes",
        "6",
    )
    try:
        other_key = server.new_key("bystander")
        # A first burst warms up what is kept on purpose (the thread pool, for instance).
        asyncio.run(_burst(server, other_key, 12))
        before = leftovers(server.data_dir)
        held_before = _fd_targets(server)
        fds_before = len(held_before)
        created, refused, health, bystander = asyncio.run(_burst(server, other_key, 12))
        assert len(created) == 6 and len(refused) == 6
        for error in refused:
            assert error.code == "node_full" and error.retry_after == 5
        assert health and all(status == 200 for status in health)
        assert bystander and all(status == 200 for status in bystander)
        assert leftovers(server.data_dir) == before
        # Sockets and files were closed, not leaked. What an ended sandbox held is released as
        # its teardown finishes, which on a busy machine may trail the answers: a moment.
        for _ in range(100):
            if _fds(server) <= fds_before + 2:
                break
            time.sleep(0.1)
        assert _fds(server) <= fds_before + 2, (held_before, _fd_targets(server))
    finally:
        server.stop_and_clean()


async def _burst(
    server: Server, other_key: str, count: int
) -> tuple[list[str], list[corral.CorralError], list[int], list[int]]:
    """`count` concurrent creates (and a command each) while others keep using the server."""
    created: list[str] = []
    refused: list[corral.CorralError] = []
    health: list[int] = []
    bystander: list[int] = []
    done = asyncio.Event()

    async def one(client: corral.AsyncClient) -> None:
        try:
            sandbox = await AsyncSandbox.create(runtime="namespaces", client=client)
        except corral.LimitReached as error:
            refused.append(error)
            return
        assert (await sandbox.run("echo ok")).stdout == "ok\n"
        created.append(sandbox.id)

    async def others() -> None:
        headers = {"Authorization": f"Bearer {other_key}"}
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            while not done.is_set():
                health.append((await http.get("/healthz")).status_code)
                answer = await http.get("/v1/sandboxes", headers=headers)
                bystander.append(answer.status_code)
                await asyncio.sleep(0.05)

    async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as client:
        watcher = asyncio.create_task(others())
        await asyncio.gather(*(one(client) for _ in range(count)))
        done.set()
        await watcher
        for sandbox_id in created:
            await (await AsyncSandbox.connect(sandbox_id, client=client)).terminate()
    return created, refused, health, bystander
