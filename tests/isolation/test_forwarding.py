"""The host routes for its sandboxes and for nothing else: Corral switches forwarding on per
interface (the sandboxes' veths and the uplink), never for the whole host, and what comes in on
an uplink it switched on is forwarded to sandboxes only."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from corral.core.spec import SandboxSpec
from corral.engine import Engine
from corral.host import network

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
            if path.exists():
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
        assert switch(network.host_iface(record.plan.network.index)) == "1"
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
        assert 'iifname @routed oifname != "crx*" drop' in chain
        # The control: had the host forwarded (what the engine used to switch on), it would.
        for iface in NEIGHBOURS:
            network.forwarding(iface).write_text("1\n")
        assert "REFUSED" in dial("crtna-ns", far_b)
    finally:
        await engine.terminate(info.id)
