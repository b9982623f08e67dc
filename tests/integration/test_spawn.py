"""How the engine starts a sandbox's runtime (`runtimes.base.spawn`): already in its cgroup,
network namespace and host user from its first instruction, through the `enter` program or,
where it is not built, a `preexec_fn`. Real cgroups and a real network namespace, no engine.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.core.errors import SandboxFailed
from corral.engine.datadir import install_tools
from corral.host import userns
from corral.host.cgroups import Cgroup, CgroupLimits
from corral.runtimes.base import spawn

UID = 4_000_000_000  # an unused host uid, above 2**31 as sandboxes' are (host.userns)


@pytest.fixture(params=["enter", "preexec"])
def enter(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    if os.geteuid() != 0:
        pytest.skip("starting a runtime needs root (cgroups, namespaces, users)")
    if request.param == "preexec":
        return None
    assert install_tools(tmp_path / "bin"), "the enter program must build (is gcc installed?)"
    return tmp_path / "bin" / "enter"


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    made = Cgroup(f"corral-spawn-test/{uuid.uuid4().hex[:12]}")
    made.create(CgroupLimits(memory_bytes=256 << 20, max_processes=64, cpu=1.0))
    yield made
    made.kill_all()
    made.destroy()


@pytest.fixture
def netns() -> Iterator[Path]:
    name = f"corral-spawn-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield Path("/run/netns") / name
    subprocess.run(["ip", "netns", "delete", name], check=True)


def run(script: str, log: Path, enter: Path | None, cgroup: Cgroup, **options: object) -> list[str]:
    """What `script` (sh) printed, started by `spawn`; it writes to its stderr, the log."""
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        child = spawn(["sh", "-c", script], cgroup=cgroup, log_fd=log_fd, enter=enter, **options)  # type: ignore[arg-type]
    finally:
        os.close(log_fd)
    assert child.wait(timeout=30) == 0, log.read_text()
    return log.read_text().splitlines()


def test_the_runtime_starts_inside_its_cgroup_network_and_user(
    enter: Path | None, cgroup: Cgroup, netns: Path, tmp_path: Path
) -> None:
    script = "cat /proc/self/cgroup >&2; readlink /proc/self/ns/net >&2; id -u >&2; id -G >&2"
    lines = run(script, tmp_path / "log", enter, cgroup, netns=netns, uid=UID)
    joined = {
        controller
        for line in lines
        if line.endswith(":/" + cgroup.name)
        for controller in line.split(":")[1].split(",")
    }
    for procs in cgroup.procs_files:  # v1: under every controller; v2: its one directory
        controller = Path(procs).relative_to("/sys/fs/cgroup").parts[0]
        assert set(controller.split(",")) <= joined if cgroup.version == "v1" else joined == {""}
    assert f"net:[{os.stat(netns).st_ino}]" in lines
    assert lines[-2:] == [str(UID), str(UID)]  # its uid, its gid and no other group
    # Nothing of the engine's is left open in it, and the descriptors it was given are closed.
    script = "ls /proc/self/fd >&2"
    assert sorted(int(fd) for fd in run(script, tmp_path / "log", enter, cgroup)) == [0, 1, 2, 3]


def test_the_runtime_keeps_the_engines_user_and_network_unless_told(
    enter: Path | None, cgroup: Cgroup, tmp_path: Path
) -> None:
    lines = run("readlink /proc/self/ns/net >&2; id -u >&2", tmp_path / "log", enter, cgroup)
    assert lines == [os.readlink("/proc/self/ns/net"), "0"]


def test_a_runtime_that_cannot_join_its_cgroup_does_not_start(
    enter: Path | None, tmp_path: Path
) -> None:
    missing = Cgroup(f"corral-spawn-test/missing-{uuid.uuid4().hex[:8]}")
    marker = tmp_path / "ran"
    log_fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(SandboxFailed) as failure:
            spawn(["sh", "-c", f"touch {marker}"], cgroup=missing, log_fd=log_fd, enter=enter)
    finally:
        os.close(log_fd)
    assert failure.value.code == "runtime_failed"
    assert "could not start sh" in failure.value.message
    assert not marker.exists()


def test_a_runtime_that_is_not_installed_fails_clearly(
    enter: Path | None, cgroup: Cgroup, tmp_path: Path
) -> None:
    log_fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(SandboxFailed) as failure:
            spawn(["no-such-runtime"], cgroup=cgroup, log_fd=log_fd, enter=enter)
    finally:
        os.close(log_fd)
    assert failure.value.code == "runtime_failed"
    assert "no-such-runtime" in failure.value.message


NS_GET_OWNER_UID = 0xB704  # ioctl: the uid that owns a user namespace


def test_a_user_namespace_belongs_to_its_slots_uid_and_maps_its_range() -> None:
    """`userns.creating` makes the namespace as the slot's host uid, so that bubblewrap, run as
    that uid, may enter it, and maps the slot's whole range into it."""
    if os.geteuid() != 0:
        pytest.skip("mapping a range of host uids needs root")
    slot = userns.SLOTS - 1  # the last slot: no sandbox of a test run is near it
    with userns.creating(slot) as userns_fd:
        fd = userns_fd()
        owner = struct.unpack("I", fcntl.ioctl(fd, NS_GET_OWNER_UID, bytes(4)))[0]
        seen = subprocess.run(
            ["nsenter", f"--user=/proc/self/fd/{fd}", "cat", "/proc/self/uid_map"],
            pass_fds=(fd,),
            capture_output=True,
            check=True,
        )
    assert owner == userns.host_uid(slot)
    assert seen.stdout.split() == [
        b"0",
        str(userns.host_uid(slot)).encode(),
        str(userns.RANGE).encode(),
    ]
