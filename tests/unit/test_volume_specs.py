"""Volumes as plain data: mount specs, plans, ids, errors, the store and the CLI's syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

import corral
from corral.client._volumes import AsyncVolume, mounts_body
from corral.core.errors import Conflict, InvalidPath, InvalidRequest, from_response
from corral.core.ids import check_id, new_id
from corral.core.names import check_volume_name
from corral.core.spec import MAX_VOLUMES, SandboxSpec, VolumeMount, check_mount_path
from corral.core.spec import check_volume_size as check_size
from corral.engine.pools import pool_key
from corral.engine.sealing import KeyRing
from corral.runtimes.plan import Bind, PlanLimits, PlanNetwork, PlanVolume, SandboxPlan
from corral.server.store import Store, VolumeEntry


def test_volume_specs_round_trip() -> None:
    spec = SandboxSpec.from_dict(
        {
            "volumes": [
                {"path": "/data", "volume": "vol-0123456789abcdef"},
                VolumeMount("/ref", "reference", read_only=True),
            ]
        }
    )
    assert spec.volumes == (
        VolumeMount("/data", "vol-0123456789abcdef"),
        VolumeMount("/ref", "reference", True),
    )
    assert spec.to_dict()["volumes"][1] == {
        "path": "/ref",
        "volume": "reference",
        "read_only": True,
    }
    assert SandboxSpec.from_dict(spec.to_dict()) == spec
    # Old records and catalogue rows have no volumes at all.
    old = SandboxSpec().to_dict()
    del old["volumes"]
    assert SandboxSpec.from_dict(old).volumes == ()


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/", "cannot be mounted at /"),
        ("data", "relative"),
        ("/data/", "normal absolute path"),
        ("/a//b", "normal absolute path"),
        ("/a/./b", "normal absolute path"),
        ("/a/../etc", "normal absolute path"),
        ("/proc", "/proc"),
        ("/proc/self", "/proc"),
        ("/sys/fs", "/sys"),
        ("/dev", "/dev"),
        ("/run", "/run/corral"),  # would hide the agent's directory
        ("/run/corral/agent", "/run/corral"),
        ("/etc", "/etc/hosts"),
        ("/etc/hosts", "/etc/hosts"),
        ("/da\0ta", "NUL"),
    ],
)
def test_bad_mount_paths_say_why(path: str, says: str) -> None:
    with pytest.raises(InvalidPath) as refused:
        check_mount_path(path)
    assert says in refused.value.message
    assert refused.value.status_code == 400


@pytest.mark.parametrize("path", ["/data", "/home/user/work", "/run/data", "/tmp/x", "/mnt"])
def test_good_mount_paths(path: str) -> None:
    assert check_mount_path(path) == path


def test_mounts_are_unique_not_nested_and_few() -> None:
    with pytest.raises(InvalidPath, match="two volumes are mounted at /data"):
        SandboxSpec(volumes=(VolumeMount("/data", "a"), VolumeMount("/data", "b")))
    with pytest.raises(InvalidPath, match="nested"):
        SandboxSpec(volumes=(VolumeMount("/data", "a"), VolumeMount("/data/sub", "b")))
    many = tuple(VolumeMount(f"/v{i}", "a") for i in range(MAX_VOLUMES + 1))
    with pytest.raises(InvalidRequest, match=f"at most {MAX_VOLUMES}"):
        SandboxSpec(volumes=many)
    assert len(SandboxSpec(volumes=many[:MAX_VOLUMES]).volumes) == MAX_VOLUMES
    # The same volume twice, at two paths, is fine.
    assert len(SandboxSpec(volumes=(VolumeMount("/a", "x"), VolumeMount("/b", "x"))).volumes) == 2


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        [{"path": "/data"}],
        [{"path": "/data", "volume": ""}],
        [{"path": "/data", "volume": "x", "read_only": "yes"}],
        [{"path": "/data", "volume": "x", "mode": "ro"}],
        [42],
    ],
)
def test_malformed_volumes_are_refused(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        SandboxSpec(volumes=bad)  # type: ignore[arg-type]


def test_pools_never_see_volumes() -> None:
    # A spec with volumes has the same pool key as one without: the engine must (and does)
    # skip pools for it rather than rely on the key.
    assert pool_key(SandboxSpec(volumes=(VolumeMount("/d", "x"),))) == pool_key(SandboxSpec())


def test_plan_stages_volumes_in_the_sandbox_directory() -> None:
    plan = SandboxPlan(
        sandbox_id="sb-0123456789abcdef",
        runtime="namespaces",
        directory="/var/lib/corral/sandboxes/sb-0123456789abcdef",
        layers=("/images/debian/rootfs",),
        binds=(Bind("/usr", "/usr"),),
        env={},
        workdir="/root",
        limits=PlanLimits(
            cpu=1, memory_bytes=1 << 29, disk_bytes=1 << 30, max_processes=64, tmp_bytes=1
        ),
        network=PlanNetwork("none"),
        uid_slot=7,
        agent_dir="/var/lib/corral/agent",
        volumes=(
            PlanVolume("vol-0123456789abcdef", "/v/vol-0123456789abcdef/mnt", "/data"),
            PlanVolume("vol-fedcba9876543210", "/v/vol-fedcba9876543210/mnt", "/ref", True),
        ),
    )
    assert SandboxPlan.from_dict(plan.to_dict()) == plan
    assert plan.volume_binds == (
        Bind("/var/lib/corral/sandboxes/sb-0123456789abcdef/volumes/0", "/data", False),
        Bind("/var/lib/corral/sandboxes/sb-0123456789abcdef/volumes/1", "/ref", True),
    )
    record = plan.to_dict()
    del record["volumes"]  # a record written before volumes existed
    assert SandboxPlan.from_dict(record).volumes == ()


def test_volume_ids_names_and_sizes() -> None:
    volume_id = new_id("vol")
    assert volume_id.startswith("vol-") and check_id(volume_id, "vol") == volume_id
    with pytest.raises(InvalidRequest):
        check_id("vol-../../etc", "vol")
    for good in ("data", "pip-cache", "a.b_c", "0"):
        assert check_volume_name(good) == good
    for bad in ("", "Data", "vol-x", "-x", "a/b", "x" * 65, "a b"):
        with pytest.raises(InvalidRequest):
            check_volume_name(bad)
    assert check_size(16) == 16
    for size in (15, 1024 * 1024 + 1, 1.5, True, "64"):
        with pytest.raises(InvalidRequest, match="size_mb"):
            check_size(size)


def test_volume_errors_come_back_as_our_classes() -> None:
    assert type(from_response(404, "volume_not_found", "m")) is corral.VolumeNotFound
    in_use = from_response(409, "volume_in_use", "m")
    assert type(in_use) is corral.VolumeInUse and isinstance(in_use, Conflict)
    assert corral.VolumeNotFound("m").status_code == 404


def test_sdk_mounts_body() -> None:
    volume = AsyncVolume("vol-0123456789abcdef", "data", 64, 0.0)
    assert not volume.is_read_only and volume.read_only().is_read_only
    assert volume.read_only().id == volume.id
    assert mounts_body({"/d": volume, "/r": volume.read_only(), "/n": "named"}) == [
        {"path": "/d", "volume": "vol-0123456789abcdef", "read_only": False},
        {"path": "/r", "volume": "vol-0123456789abcdef", "read_only": True},
        {"path": "/n", "volume": "named", "read_only": False},
    ]


def test_cli_volume_syntax() -> None:
    from typer import Exit

    from corral.cli._volumes import parse_volume

    assert parse_volume("data:/data") == ("data", "/data", False)
    assert parse_volume("data:/data:ro") == ("data", "/data", True)
    assert parse_volume("data:/data:rw") == ("data", "/data", False)
    for bad in ("data", ":/data", "data:rel"):
        with pytest.raises(Exit):
            parse_volume(bad)


async def test_store_keeps_volumes_per_key(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "corral.db", KeyRing([bytes(32)]))
    try:
        alice, _ = await store.create_key("alice")
        bob, _ = await store.create_key("bob")
        entry = VolumeEntry("vol-0123456789abcdef", "data", 64, 1.0)
        await store.add_volume(alice.id, entry)
        with pytest.raises(Conflict) as taken:
            await store.add_volume(alice.id, VolumeEntry("vol-fedcba9876543210", "data", 64, 2.0))
        assert taken.value.code == "volume_exists"
        await store.add_volume(bob.id, VolumeEntry("vol-fedcba9876543210", "data", 64, 2.0))
        assert await store.find_volume(alice.id, "data") == entry
        assert await store.find_volume(alice.id, entry.id) == entry
        assert await store.find_volume(bob.id, entry.id) is None  # another key's, by id
        assert [v.id for v in await store.list_volumes(bob.id)] == ["vol-fedcba9876543210"]
        await store.remove_volume(alice.id, entry.id)
        assert await store.list_volumes(alice.id) == []
    finally:
        await store.close()
