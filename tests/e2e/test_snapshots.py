"""Memory snapshots and fork (gvisor) through the SDK: copies that diverge, names, ttl, crashes."""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import corral
from corral import Sandbox, SandboxState, Volume
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server
from tests.e2e.test_lifecycle import COUNTER, count

pytestmark = pytest.mark.usefixtures("gvisor")


@pytest.fixture
def gvisor() -> None:
    require_runtime("gvisor")


def counting(client: corral.Client, **options: object) -> Sandbox:
    sandbox = Sandbox.create(runtime="gvisor", timeout=300, client=client, **options)  # type: ignore[arg-type]
    sandbox.exec("python3", "-c", COUNTER)
    deadline = time.monotonic() + 30
    while not sandbox.files.exists("/root/count"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return sandbox


def test_fork_of_three_diverges(client: corral.Client) -> None:
    with counting(client) as origin:
        origin.files.write("/root/shared", "from the origin")
        at_fork = count(origin)
        copies = origin.fork(3)
        try:
            assert len({c.id for c in copies} | {origin.id}) == 4
            for index, copy in enumerate(copies):
                copy.files.write("/root/mine", f"copy {index}")
            time.sleep(0.3)
            for index, copy in enumerate(copies):
                assert copy.files.read_text("/root/shared") == "from the origin"
                assert copy.files.read_text("/root/mine") == f"copy {index}"
                assert count(copy) >= at_fork  # its memory went on from the fork
                assert copy.info().state is SandboxState.RUNNING
            assert not origin.files.exists("/root/mine")
            assert count(origin) > at_fork  # the origin never stopped
        finally:
            for copy in copies:
                copy.terminate()
    assert client.list_snapshots() == []  # fork's own snapshot is gone


def test_snapshots_are_named_listed_reused_and_deleted(
    server: Server, client: corral.Client
) -> None:
    with counting(client, env={"ORIGIN": "yes"}) as origin:
        origin.files.write("/root/state", "snapped")
        taken = origin.snapshot(name="base-state")
        assert taken.sandbox_id == origin.id and taken.size_bytes > 0
        with pytest.raises(corral.Conflict):
            origin.snapshot(name="base-state")
        origin.files.write("/root/state", "changed after")
    assert [s.name for s in client.list_snapshots()] == ["base-state"]
    for _ in range(2):  # one snapshot, several sandboxes
        with Sandbox.create(snapshot="base-state", env={"EXTRA": "1"}, client=client) as copy:
            assert copy.info().runtime == "gvisor"
            assert copy.files.read_text("/root/state") == "snapped"
            assert copy.run("echo $ORIGIN $EXTRA").stdout == "yes 1\n"
            assert count(copy) > 0
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    conflicting = httpx.post(
        f"{server.url}/v1/sandboxes",
        json={"snapshot": taken.id, "runtime": "namespaces"},
        headers=headers,
    )
    assert conflicting.status_code == 400 and "runtime" in conflicting.json()["error"]["message"]
    with server.client(server.new_key("snoop")) as other:
        assert other.list_snapshots() == []
        with pytest.raises(corral.NotFound):
            Sandbox.create(snapshot=taken.id, client=other)
    client.delete_snapshot("base-state")
    with pytest.raises(corral.NotFound) as gone:
        Sandbox.create(snapshot=taken.id, client=client)
    assert gone.value.code == "snapshot_not_found"
    with Sandbox.create(runtime="namespaces", client=client) as plain:
        with pytest.raises(corral.InvalidRequest) as refused:
            plain.snapshot()
        assert refused.value.code == "not_supported" and "gvisor" in refused.value.message
        with pytest.raises(corral.InvalidRequest):
            plain.fork(2)


def test_a_snapshot_expires_after_its_ttl(client: corral.Client) -> None:
    with Sandbox.create(runtime="gvisor", client=client) as sandbox:
        taken = sandbox.snapshot(ttl=1)
        assert taken.expires_at is not None
        deadline = time.monotonic() + 30
        while any(s.id == taken.id for s in client.list_snapshots()):
            assert time.monotonic() < deadline, "the snapshot outlived its ttl"
            time.sleep(0.2)
        with pytest.raises(corral.InvalidRequest):
            sandbox.snapshot(ttl=0)


@pytest.fixture
def own_server(data_dir: Path) -> Iterator[Server]:
    running = start_server(SERVER_DIR.with_name(SERVER_DIR.name + "-snap"), data_dir / "images")
    yield running
    running.stop_and_clean()


def test_snapshots_survive_restarts_and_a_crash_never_leaves_a_broken_one(
    own_server: Server,
) -> None:
    with own_server.client() as sdk:
        sandbox = counting(sdk, memory_mb=1024)
        sandbox.run("python3 -c \"open('/root/blob', 'wb').write(bytes(range(256)) * 2**20)\"")
        kept = sandbox.snapshot(name="kept")

        def snapshot_while_killed() -> None:
            with contextlib.suppress(corral.CorralError):  # the server dies under it
                sandbox.snapshot(name="interrupted")

        writer = threading.Thread(target=snapshot_while_killed)
        writer.start()
        time.sleep(0.1)
        own_server.stop(signal.SIGKILL)
        writer.join(timeout=60)
    own_server.start()
    snapshots_dir = own_server.data_dir / "snapshots"
    assert not list(snapshots_dir.glob(".tmp-*"))  # an interrupted write was swept
    with own_server.client() as sdk:
        names = {s.name: s for s in sdk.list_snapshots()}
        assert names["kept"].id == kept.id
        # Whatever was listed is whole: every snapshot starts a working sandbox.
        for snapshot in names.values():
            with Sandbox.create(snapshot=snapshot.id, client=sdk) as copy:
                assert copy.run("wc -c < /root/blob").stdout == f"{256 * 2**20}\n"
                assert count(copy) > 0
        Sandbox.connect(sandbox.id, client=sdk).terminate()


def test_forks_and_hibernation_keep_their_volumes(client: corral.Client) -> None:
    volume = Volume.create(f"fork-{secrets.token_hex(4)}", size_mb=64, client=client)
    try:
        with Sandbox.create(runtime="gvisor", volumes={"/data": volume}, client=client) as origin:
            origin.files.write("/data/before", "shared")
            copies = origin.fork(2)
            try:
                for index, copy in enumerate(copies):
                    assert copy.files.read_text("/data/before") == "shared"
                    copy.files.write(f"/data/copy-{index}", "written by a copy")
                assert sorted(f.name for f in origin.files.list("/data")) == [
                    "before",
                    "copy-0",
                    "copy-1",
                ]
            finally:
                for copy in copies:
                    copy.terminate()
            origin.hibernate()
            assert origin.files.read_text("/data/copy-1") == "written by a copy"  # woke
    finally:
        volume.delete()
