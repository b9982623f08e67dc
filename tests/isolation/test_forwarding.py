"""The host routes for its sandboxes and for nothing else: Corral switches forwarding on per
interface (the sandboxes' veths and the uplink), never for the whole host, and what comes in on
an uplink it switched on is forwarded to sandboxes only."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.core.egress import EgressPolicy
from corral.core.spec import SandboxSpec
from corral.engine import Engine
from corral.host import cgroups, network, userns
from corral.host.scope import HostScope
from corral.runtimes.base import cgroup_for
from tests.conftest import new, require_runtime

# Two fake neighbours of the host, each in its own namespace behind a veth (documentation
# addresses, never routed anywhere real).
NEIGHBOURS = {
    "crtna": ("198.51.100.1", "198.51.100.2"),
    "crtnb": ("203.0.113.1", "203.0.113.2"),
}

DIAL = """
import errno, socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], 9))
    print("CONNECTED")
except ConnectionRefusedError:
    print("REFUSED")  # the far end answered: the packet got there
except OSError as exc:
    print("UNREACHABLE", errno.errorcode.get(exc.errno or 0, exc))
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def dial(netns: str | None, address: str) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    argv = [*prefix, sys.executable, "-c", DIAL, address]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture
def fresh_host() -> Iterator[None]:
    """The host as a fresh machine is (forwarding off everywhere) with two neighbours; the
    forwarding switches and Corral's record of the uplinks it owns are restored afterwards."""
    saved = {path: path.read_text() for path in network.SYSCTL_DIR.glob("*/forwarding")}
    owned = network.routed_by_corral()
    network.forwarding("all").write_text("0\n")  # also sets `default` and every interface
    for iface, (host_side, far_side) in NEIGHBOURS.items():
        netns = f"{iface}-ns"
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        # A namespace goes away lazily, and its veth with it: one from the test before may
        # still be there.
        subprocess.run(["ip", "link", "del", iface], capture_output=True, check=False)
        ip("netns", "add", netns)
        ip("link", "add", iface, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("addr", "add", f"{host_side}/30", "dev", iface)
        ip("link", "set", iface, "up")
        ip("-n", netns, "addr", "add", f"{far_side}/30", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "route", "add", "default", "via", host_side)
    try:
        yield
    finally:
        for iface in NEIGHBOURS:
            subprocess.run(["ip", "netns", "del", f"{iface}-ns"], capture_output=True, check=False)
        order = sorted(saved, key=lambda path: path.parent.name not in ("all", "default"))
        for path in order:
            with contextlib.suppress(FileNotFoundError):  # its interface went away meanwhile
                path.write_text(saved[path])
        subprocess.run(["nft", "flush", "set", "inet", "corral", "routed"], check=False)
        for iface in owned:
            subprocess.run(
                ["nft", "add", "element", "inet", "corral", "routed", f'{{ "{iface}" }}'],
                check=False,
            )


def switch(iface: str) -> str:
    return network.forwarding(iface).read_text().strip()


async def test_the_host_routes_for_its_sandboxes_only(engine: Engine, fresh_host: None) -> None:
    far_a, far_b = NEIGHBOURS["crtna"][1], NEIGHBOURS["crtnb"][1]
    assert "REFUSED" in dial(None, far_b)  # the neighbours answer the host itself
    info = await engine.create(SandboxSpec(runtime="namespaces", network="internet"))
    try:
        record = engine.registry.get(info.id)
        uplinks = network.uplinks()
        assert uplinks, "the host has no default route"
        assert switch("all") == "0"
        assert switch(record.plan.host_scope.iface(record.plan.network.index)) == "1"
        for iface in uplinks:
            assert switch(iface) == "1"
        assert set(uplinks) <= network.routed_by_corral()
        for iface in NEIGHBOURS:
            assert switch(iface) == "0"
        # One neighbour cannot use the host as a router to reach the other.
        assert "REFUSED" not in dial("crtna-ns", far_b)
        assert "REFUSED" not in dial("crtnb-ns", far_a)
        # ...while the sandbox still reaches the internet through the uplink.
        fetched = await engine.run(
            info.id,
            "python3 -c \"import urllib.request as u; print(u.urlopen('https://pypi.org/simple/six/',"
            ' timeout=60).status)"',
            timeout=120,
        )
        assert fetched.stdout.strip() == b"200", fetched.stderr
        # And the uplink is guarded in the firewall: what enters on it goes to sandboxes only.
        chain = subprocess.run(
            ["nft", "list", "chain", "inet", "corral", "forward"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert 'iifname @routed oifname != "crx*" oifname != "cr0*"' in chain
        # The control: had the host forwarded (what the engine used to switch on), it would.
        for iface in NEIGHBOURS:
            network.forwarding(iface).write_text("1\n")
        assert "REFUSED" in dial("crtna-ns", far_b)
    finally:
        await engine.terminate(info.id)


FETCH = (
    "python3 -c \"import urllib.request as u; print(u.urlopen('https://pypi.org/simple/six/',"
    ' timeout=60).status)"'
)


@contextlib.asynccontextmanager
async def scoped_engine(data_dir: Path, index: int) -> AsyncIterator[Engine]:
    """An engine in host scope `index`, on a data directory of its own that shares the test
    images, as one node of a local cluster."""
    own = Path(tempfile.mkdtemp(prefix=f"{data_dir.name}-scope{index}-", dir=data_dir.parent))
    try:
        own.chmod(0o711)
        (own / "images").symlink_to(data_dir / "images")
        async with Engine(own, scope=HostScope(index), boot_images=False) as engine:
            yield engine
    finally:
        shutil.rmtree(own, ignore_errors=True)
        # Tables outlive engines (until reboot); this one would keep claiming the uplink.
        subprocess.run(["nft", "delete", "table", "inet", f"corral_{index}"], check=False)


def nft(*args: str) -> str:
    return subprocess.run(["nft", *args], capture_output=True, text=True, check=True).stdout


def scope_leftovers(index: int) -> list[str]:
    """What scope `index`'s sandboxes left: interfaces and cgroups."""
    scope = HostScope(index)
    ifaces = [i.name for i in Path("/sys/class/net").iterdir()]
    group = cgroups.ROOT / ("memory" if cgroups.layout() == "v1" else "") / scope.cgroup_parent
    return new([i for i in ifaces if i.startswith(scope.iface_prefix)]) + (
        new(g.name for g in group.glob("sb-*")) if group.is_dir() else []
    )


async def test_engines_in_two_scopes_share_the_host(data_dir: Path, fresh_host: None) -> None:
    """Two engines on one machine, as two nodes of a local cluster: each sandbox gets its
    engine's cgroup, firewall table, interface and ranges; both reach the internet at once
    (neither engine's table drops the other's replies); one's rules and cleanup leave the
    other's sandbox alone; the neighbours still cannot route through the host."""
    require_runtime("namespaces")
    require_runtime("gvisor")
    closed = EgressPolicy.parse({"allow": []})
    async with scoped_engine(data_dir, 1) as one, scoped_engine(data_dir, 2) as two:
        a = await one.create(SandboxSpec(runtime="namespaces", network="internet"))
        b = await two.create(SandboxSpec(runtime="gvisor", network="internet"))
        c = await two.create(SandboxSpec(runtime="namespaces", network="internet", egress=closed))
        plans = {
            1: [one.registry.get(a.id).plan],
            2: [two.registry.get(b.id).plan, two.registry.get(c.id).plan],
        }
        for index, scoped in plans.items():
            scope = HostScope(index)
            for plan in scoped:
                assert plan.scope == index
                assert plan.uid_slot in scope.share(userns.SLOTS)
                assert plan.network.index in scope.share(network.POOL_SIZE)
                assert switch(scope.iface(plan.network.index)) == "1"
                assert cgroup_for(plan).exists()
        assert cgroup_for(plans[2][0]).name.startswith("corral-2/")
        # The closed sandbox's rules are in its engine's table only.
        assert f"sandbox_{plans[2][1].network.index}" in nft("list", "table", "inet", "corral_2")
        assert "sandbox_" not in nft("list", "table", "inet", "corral_1")
        fetched = await asyncio.gather(
            one.run(a.id, FETCH, timeout=120), two.run(b.id, FETCH, timeout=120)
        )
        for result in fetched:
            assert result.stdout.strip() == b"200", result.stderr
        blocked = await two.run(c.id, FETCH, timeout=120)
        assert blocked.exit_code != 0
        assert "REFUSED" not in dial("crtna-ns", NEIGHBOURS["crtnb"][1])
        # One engine ending its sandbox and closing leaves the other's working.
        await one.terminate(a.id)
        assert scope_leftovers(1) == []
        again = await two.run(b.id, FETCH, timeout=120)
        assert again.stdout.strip() == b"200", again.stderr
        for info in (b, c):
            await two.terminate(info.id)
    assert scope_leftovers(1) == [] and scope_leftovers(2) == []
