"""Persistent volumes on a real server: sharing across sandboxes and runtimes, persistence,
quotas, read-only mounts, tenants, restarts, bad input, the CLI, and nothing left behind."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import corral
from corral import Sandbox, Volume, runtimes
from tests.conftest import leftovers, require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server
from tests.e2e.test_cli import corral as corral_cli

RUNTIMES = ("namespaces", "gvisor")


def fresh_name() -> str:
    return "v" + secrets.token_hex(6)


def host_mounts(server: Server) -> list[str]:
    """Mount points under the server's data directory: volumes and sandboxes (not the
    images', nor the engine's own memory filesystem for boot images)."""
    root = str(server.data_dir)
    return sorted(
        point
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if (point := line.split()[4]).startswith(root + "/")
        and not point.startswith(root + "/images")
        and point != root + "/boots"
    )


def volume_mounted(server: Server, volume: Volume) -> bool:
    return str(server.data_dir / "volumes" / volume.id / "mnt") in host_mounts(server)


def wait_unmounted(server: Server, volume: Volume) -> None:
    for _ in range(100):  # hang bound only: unmounting follows the end at once
        if not volume_mounted(server, volume):
            return
        time.sleep(0.05)
    raise AssertionError(f"{volume.id} is still mounted: {host_mounts(server)}")


@pytest.mark.parametrize(
    ("writer", "reader"),
    [(w, r) for w in RUNTIMES for r in RUNTIMES],
    ids=str,
)
def test_two_sandboxes_share_a_volume_at_once(
    server: Server, client: corral.Client, writer: str, reader: str
) -> None:
    require_runtime(writer)
    require_runtime(reader)
    volume = Volume.create(fresh_name(), size_mb=64, client=client)
    try:
        with (
            Sandbox.create(runtime=writer, volumes={"/data": volume}, client=client) as first,
            Sandbox.create(
                runtime=reader, volumes={"/shared": volume.name}, client=client
            ) as second,
        ):
            # Root in one sandbox is root in the other (and uid 1000 stays 1000), whatever
            # host uid range and runtime each has.
            made = first.run(
                "echo hello > /data/a.txt && mkdir /data/dir && echo deep > /data/dir/b.txt"
                " && echo user > /data/u.txt && chown 1000:1000 /data/u.txt"
            )
            assert made.exit_code == 0, made.stderr
            seen = second.run(
                "cat /shared/a.txt /shared/dir/b.txt && stat -c '%u:%g %n' /shared/a.txt "
                "/shared/u.txt /shared"
            )
            assert seen.stdout.splitlines() == [
                "hello",
                "deep",
                "0:0 /shared/a.txt",
                "1000:1000 /shared/u.txt",
                "0:0 /shared",
            ], seen.stderr
            # And the other way round, while both still run.
            back = second.run("echo reply >> /shared/a.txt && rm /shared/dir/b.txt")
            assert back.exit_code == 0, back.stderr
            assert first.run("cat /data/a.txt; ls /data/dir").stdout == "hello\nreply\n"
            assert second.files.read_text("/shared/a.txt") == "hello\nreply\n"
            (mount,) = first.info().spec.volumes
            assert (mount.path, mount.volume, mount.read_only) == ("/data", volume.id, False)
            now = volume.refresh()
            assert sorted(now.sandboxes) == sorted([first.id, second.id])
            assert now.used_bytes > 0
    finally:
        wait_unmounted(server, volume)
        volume.delete()


def test_files_persist_after_every_sandbox_ends(server: Server, client: corral.Client) -> None:
    volume = Volume.create(fresh_name(), size_mb=32, client=client)
    for runtime in RUNTIMES:
        require_runtime(runtime)
        with Sandbox.create(runtime=runtime, volumes={"/data": volume}, client=client) as sandbox:
            assert sandbox.run(f"echo {runtime} >> /data/log").exit_code == 0
            assert volume_mounted(server, volume)
        wait_unmounted(server, volume)  # the last sandbox using it ended
        # The next sandbox mounts it again and finds everything.
        with Sandbox.create(runtime="namespaces", volumes={"/v": volume}, client=client) as again:
            assert runtime in again.run("cat /v/log").stdout
            assert again.run("ls -A /v").stdout == "log\n"  # no lost+found
        wait_unmounted(server, volume)
    assert volume.refresh().used_bytes > 0  # kept from its last unmount
    volume.delete()
    assert not (server.data_dir / "volumes" / volume.id).exists()
    assert leftovers(server.data_dir)["mounts"] == []


def test_a_full_volume_is_no_space(client: corral.Client, runtime: str) -> None:
    volume = Volume.create(fresh_name(), size_mb=16, client=client)
    try:
        with Sandbox.create(
            runtime=runtime, disk_mb=256, volumes={"/small": volume}, client=client
        ) as sandbox:
            filled = sandbox.run("dd if=/dev/zero of=/small/big bs=1M count=32 conv=fsync")
            assert filled.exit_code != 0
            assert "No space left on device" in filled.stderr
            with pytest.raises(corral.NoSpace):
                sandbox.files.write("/small/more", b"x" * (4 << 20))
            # The sandbox's own disk is not the volume's: it still has room.
            assert sandbox.run("head -c 4M /dev/zero > /root/fine").exit_code == 0
            # Freeing space makes room again.
            assert sandbox.run("rm /small/big && echo ok > /small/after").exit_code == 0
    finally:
        volume.delete()


def test_a_read_only_mount_refuses_writes(client: corral.Client, runtime: str) -> None:
    volume = Volume.create(fresh_name(), size_mb=16, client=client)
    try:
        with Sandbox.create(runtime="namespaces", volumes={"/w": volume}, client=client) as setup:
            assert setup.run("echo reference > /w/ref.txt").exit_code == 0
        with Sandbox.create(
            runtime=runtime, volumes={"/ref": volume.read_only()}, client=client
        ) as sandbox:
            assert sandbox.info().spec.volumes[0].read_only
            assert sandbox.run("cat /ref/ref.txt").stdout == "reference\n"
            for cmd in (
                "echo x > /ref/new",
                "echo x >> /ref/ref.txt",
                "rm /ref/ref.txt",
                "mkdir /ref/d",
                "chmod 777 /ref/ref.txt",
            ):
                refused = sandbox.run(cmd)
                assert refused.exit_code != 0, cmd
                assert "Read-only file system" in refused.stderr, (cmd, refused.stderr)
            assert sandbox.run("mount -o remount,rw /ref").exit_code != 0
            with pytest.raises(corral.PermissionDenied):
                sandbox.files.write("/ref/new", "x")
        with Sandbox.create(runtime="namespaces", volumes={"/w": volume}, client=client) as check:
            assert check.run("ls /w").stdout == "ref.txt\n"
    finally:
        volume.delete()


def test_list_get_delete_and_in_use(server: Server, client: corral.Client) -> None:
    name = fresh_name()
    volume = Volume.create(name, size_mb=20, client=client)
    assert volume.id.startswith("vol-") and volume.size_mb == 20 and volume.created_at > 0
    assert volume.id in [v.id for v in Volume.list(client=client)]
    assert Volume.from_name(name, client=client).id == volume.id
    assert Volume.from_name(volume.id, client=client).name == name
    with pytest.raises(corral.Conflict) as taken:
        Volume.create(name, client=client)
    assert taken.value.code == "volume_exists"
    assert Volume.from_name(name, create_if_missing=True, client=client).id == volume.id
    other = Volume.from_name(fresh_name(), create_if_missing=True, size_mb=16, client=client)
    assert other.size_mb == 16
    other.delete()
    disk = server.data_dir / "volumes" / volume.id
    assert (disk / "disk.img").is_file() and disk.stat().st_mode & 0o777 == 0o700
    assert (server.data_dir / "volumes").stat().st_mode & 0o777 == 0o700

    sandbox = Sandbox.create(runtime="namespaces", volumes={"/data": volume}, client=client)
    with pytest.raises(corral.VolumeInUse) as busy:
        volume.delete()
    assert busy.value.code == "volume_in_use" and sandbox.id in busy.value.message
    assert volume.refresh().sandboxes == (sandbox.id,)
    sandbox.terminate()
    assert volume.refresh().sandboxes == ()
    volume.delete()
    assert not disk.exists()
    with pytest.raises(corral.VolumeNotFound):
        Volume.from_name(name, client=client)
    with pytest.raises(corral.VolumeNotFound):
        volume.delete()
    with pytest.raises(corral.VolumeNotFound):
        Sandbox.create(runtime="namespaces", volumes={"/data": volume}, client=client)


def test_another_key_can_neither_see_nor_mount_a_volume(server: Server) -> None:
    name = fresh_name()
    with server.client() as owner, server.client(server.new_key("other")) as stranger:
        volume = Volume.create(name, size_mb=16, client=owner)
        for ref in (name, volume.id):
            with pytest.raises(corral.VolumeNotFound):
                Volume.from_name(ref, client=stranger)
            with pytest.raises(corral.VolumeNotFound):
                Sandbox.create(runtime="namespaces", volumes={"/x": ref}, client=stranger)
        forged = corral.AsyncVolume(volume.id, name, 16, 0.0, client=stranger._async)
        with pytest.raises(corral.VolumeNotFound):
            stranger.call(forged.delete())  # a handle made up with the other key's client
        assert [v.id for v in Volume.list(client=stranger)] == []
        # Names are per key: the other key may use the same one for its own volume.
        own = Volume.create(name, size_mb=16, client=stranger)
        assert own.id != volume.id
        own.delete()
        assert Volume.from_name(name, client=owner).id == volume.id  # untouched
        volume.delete()


def test_bad_volume_requests_are_clear_4xx(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        made = http.post("/v1/volumes", json={"name": fresh_name(), "size_mb": 16})
        assert made.status_code == 201, made.text
        vid = made.json()["id"]

        def create(volumes: object) -> tuple[int, str, str]:
            body = {"runtime": "namespaces", "volumes": volumes}
            answer = http.post("/v1/sandboxes", json=body)
            error = answer.json().get("error", {})
            return answer.status_code, error.get("code", ""), error.get("message", "")

        for path, says in [
            ("/", "cannot be mounted at /"),
            ("relative", "relative"),
            ("/proc/x", "/proc"),
            ("/run/corral", "/run/corral"),
            ("/dev", "/dev"),
            ("/sys", "/sys"),
            ("/a/../b", "normal absolute path"),
        ]:
            status, code, message = create([{"path": path, "volume": vid}])
            assert (status, code) == (400, "invalid_path"), (path, message)
            assert says in message
        status, code, message = create([{"path": "/a", "volume": vid}] * 2)
        assert (status, code) == (400, "invalid_path") and "/a" in message
        status, code, message = create([{"path": f"/v{i}", "volume": vid} for i in range(17)])
        assert (status, code) == (400, "invalid_request") and "16" in message
        status, code, message = create([{"path": "/data", "volume": "no-such-volume"}])
        assert (status, code) == (404, "volume_not_found") and "no-such-volume" in message
        status, code, _ = create([{"path": "/data", "volume": vid, "mode": "ro"}])
        assert (status, code) == (400, "invalid_request")
        for body, code in [
            ({"name": "Bad Name"}, "invalid_request"),
            ({"name": "vol-x"}, "invalid_request"),
            ({"name": fresh_name(), "size_mb": 8}, "invalid_request"),
            ({"name": fresh_name(), "size_mb": 10**9}, "invalid_request"),
            ({"name": fresh_name(), "size": 64}, "invalid_request"),
        ]:
            answer = http.post("/v1/volumes", json=body)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == code
        assert http.get("/v1/volumes/nope").json()["error"]["code"] == "volume_not_found"
        assert http.delete("/v1/volumes/nope").status_code == 404
        assert http.delete(f"/v1/volumes/{vid}").status_code == 204
    # None of the refused creates left a sandbox behind.
    with server.client() as sdk:
        running = Sandbox.list(state="running", client=sdk)
    assert not [s for s in running if s.spec.volumes]


def test_symlinks_in_a_volume_stay_inside_sandboxes(server: Server, client: corral.Client) -> None:
    volume = Volume.create(fresh_name(), size_mb=16, client=client)
    marker = server.data_dir / f"host-secret-{secrets.token_hex(4)}"
    marker.write_text("host only")
    try:
        with Sandbox.create(runtime="namespaces", volumes={"/data": volume}, client=client) as one:
            planted = one.run(
                f"ln -s {marker} /data/to-host && ln -s / /data/root && "
                "cp /bin/true /data/suid && chmod 4755 /data/suid"
            )
            assert planted.exit_code == 0, planted.stderr
        for runtime in RUNTIMES:
            require_runtime(runtime)
            with Sandbox.create(runtime=runtime, volumes={"/data": volume}, client=client) as two:
                # Resolved in the sandbox's own root: the host's file is not there.
                assert two.run("cat /data/to-host").exit_code != 0
                with pytest.raises(corral.FileNotFound):
                    two.files.read("/data/to-host")
                assert two.run("ls /data/root/run/corral").stdout.split() == ["agent", "sock"]
                # On the host the volume is mounted nosuid, nodev, in a root-only directory.
                options = [
                    line.split()[5]
                    for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if line.split()[4] == str(server.data_dir / "volumes" / volume.id / "mnt")
                ]
                assert options and "nosuid" in options[0] and "nodev" in options[0]
    finally:
        marker.unlink()
        wait_unmounted(server, volume)
        volume.delete()


@pytest.fixture
def own_server(data_dir: Path) -> Iterator[Server]:
    require_runtime("namespaces")
    running = start_server(SERVER_DIR.with_name(SERVER_DIR.name + "-volumes"), data_dir / "images")
    yield running
    running.stop_and_clean()


def test_volumes_survive_a_server_crash(own_server: Server) -> None:
    usable = [r for r in RUNTIMES if runtimes.unavailable_reason(r) is None]
    with own_server.client() as sdk:
        kept = Volume.create("kept", size_mb=32, client=sdk)
        lonely = Volume.create("lonely", size_mb=16, client=sdk)
        idle = Volume.create("idle", size_mb=16, client=sdk)
        with Sandbox.create(runtime="namespaces", volumes={"/i": idle}, client=sdk) as s:
            s.run("echo before > /i/file")
        running = [
            Sandbox.create(runtime=r, timeout=600, volumes={"/data": kept}, client=sdk)
            for r in usable
        ]
        for sandbox in running:
            assert sandbox.run(f"echo {sandbox.id} >> /data/ids").exit_code == 0
        doomed = Sandbox.create(runtime="namespaces", volumes={"/l": lonely}, client=sdk)
        assert doomed.run("echo last > /l/words").exit_code == 0
        doomed_pid = json.loads(
            (own_server.data_dir / "sandboxes" / doomed.id / "sandbox.json").read_text()
        )["pid"]
        own_server.stop(signal.SIGKILL)
    os.kill(doomed_pid, signal.SIGKILL)  # the only sandbox using `lonely` dies meanwhile
    own_server.start()

    with own_server.client() as sdk:
        assert volume_mounted(own_server, kept)  # its sandboxes were adopted, mounts kept
        wait_unmounted(own_server, lonely)  # the sweep after adoption unmounted it
        for sandbox in running:
            again = Sandbox.connect(sandbox.id, client=sdk)
            assert again.run(f"grep -c {sandbox.id} /data/ids").stdout == "1\n"
            assert again.run("echo after >> /data/ids").exit_code == 0
        assert sorted(Volume.from_name("kept", client=sdk).sandboxes) == sorted(
            s.id for s in running
        )
        for sandbox in running:
            Sandbox.connect(sandbox.id, client=sdk).terminate()
        wait_unmounted(own_server, kept)
        with Sandbox.create(
            runtime="namespaces",
            volumes={"/k": "kept", "/l": "lonely", "/i": idle.read_only()},
            client=sdk,
        ) as check:
            listing = check.run("cat /l/words /i/file; grep -c after /k/ids").stdout
            assert listing == f"last\nbefore\n{len(running)}\n"
        for volume in (kept, lonely, idle):
            wait_unmounted(own_server, volume)
            Volume.from_name(volume.id, client=sdk).delete()  # `volume` has the old client
    assert leftovers(own_server.data_dir)["mounts"] == []
    assert host_mounts(own_server) == []


def test_cli_volumes(server: Server) -> None:
    name = fresh_name()
    made = corral_cli(server, "volume", "create", name, "--size", "16")
    assert made.returncode == 0, made.stderr
    volume_id = made.stdout.strip()
    assert volume_id.startswith("vol-")
    listed = json.loads(corral_cli(server, "volume", "list", "--json").stdout)
    (entry,) = [v for v in listed if v["id"] == volume_id]
    assert (entry["name"], entry["size_mb"], entry["sandboxes"]) == (name, 16, [])
    wrote = corral_cli(
        server,
        "run",
        "--runtime",
        "namespaces",
        "--volume",
        f"{name}:/data",
        "--",
        "sh",
        "-c",
        "echo from-cli > /data/f",
    )
    assert wrote.returncode == 0, wrote.stderr
    read = corral_cli(
        server,
        "run",
        "--runtime",
        "namespaces",
        "-v",
        f"{name}:/data:ro",
        "--",
        "sh",
        "-c",
        "cat /data/f; touch /data/g",
    )
    assert read.stdout == "from-cli\n" and "Read-only" in read.stderr and read.returncode != 0
    created = corral_cli(
        server, "sandbox", "create", "--runtime", "namespaces", "--volume", f"{name}:/data"
    )
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    info = corral_cli(server, "sandbox", "info", sandbox_id)
    assert f"{volume_id}:/data" in info.stdout
    busy = corral_cli(server, "volume", "rm", name)
    assert busy.returncode == 2 and "volume_in_use" in busy.stderr and sandbox_id in busy.stderr
    corral_cli(server, "sandbox", "kill", sandbox_id)
    bad = corral_cli(server, "run", "--volume", "nocolon", "--", "true")
    assert bad.returncode == 2 and "NAME:/path" in bad.stderr
    removed = corral_cli(server, "volume", "rm", name)
    assert removed.returncode == 0, removed.stderr
    missing = corral_cli(server, "volume", "rm", name)
    assert missing.returncode == 2 and "volume_not_found" in missing.stderr


async def test_the_async_sdk(aclient: corral.AsyncClient) -> None:
    name = fresh_name()
    volume = await corral.AsyncVolume.from_name(
        name, create_if_missing=True, size_mb=16, client=aclient
    )
    assert (volume.name, volume.size_mb, volume.is_read_only) == (name, 16, False)
    assert volume.id in [v.id for v in await corral.AsyncVolume.list(client=aclient)]
    async with await corral.AsyncSandbox.create(
        runtime="namespaces", volumes={"/w": volume}, client=aclient
    ) as writer:
        assert (await writer.run("echo async > /w/f")).exit_code == 0
        assert (await volume.refresh()).sandboxes == (writer.id,)
    async with await corral.AsyncSandbox.create(
        runtime="namespaces", volumes={"/r": volume.read_only()}, client=aclient
    ) as reader:
        assert (await reader.run("cat /r/f")).stdout == "async\n"
        assert (await reader.info()).spec.volumes[0].read_only
    await volume.delete()
    with pytest.raises(corral.VolumeNotFound):
        await corral.AsyncVolume.from_name(name, client=aclient)
