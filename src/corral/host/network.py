"""Networking for `internet` sandboxes: a network namespace, a veth pair, NAT and a firewall.

Each internet sandbox gets a network namespace made on the host (so nothing inside can
reconfigure it), with one veth whose host end is its gateway, addresses from 100.96.0.0/16 (a
/30 each) and a default route out. One nftables table, ``inet corral``, then decides:

- traffic from sandboxes to the host itself (any of its addresses, its loopback services) is
  dropped on input;
- forwarded traffic from a sandbox to another sandbox, to private, link-local (cloud metadata),
  shared, multicast or reserved ranges is dropped, except DNS to the host's own nameservers;
- nothing may open a connection *into* a sandbox; replies to its own connections pass;
- the rest is masqueraded out of the host's default route.

Forwarding is switched on per interface, never for the whole host: on each sandbox's veth and on
the interfaces of the default route (replies come in there). An uplink whose forwarding Corral
turned on is listed in the table's ``routed`` set, and what comes in on it is forwarded only to
sandboxes, so the host never starts routing for its neighbours. An uplink that already forwarded
is the operator's choice and left alone. Both the setting and the table live until reboot.

`none` sandboxes need none of this: they get a fresh namespace with only a loopback.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

from corral.core.errors import SandboxFailed

POOL = ipaddress.ip_network("100.96.0.0/16")
POOL_SIZE = POOL.num_addresses // 4
IFACE_PREFIX = "crx"
NETNS_DIR = Path("/run/netns")
SYSCTL_DIR = Path("/proc/sys/net/ipv4/conf")

BLOCKED_RANGES = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


def _run(argv: list[str], what: str, stdin: str | None = None) -> None:
    try:
        subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True, timeout=30)
    except FileNotFoundError as exc:
        raise SandboxFailed(
            f"cannot {what}: {argv[0]} is not installed", code="missing_dependency"
        ) from exc
    except subprocess.CalledProcessError as exc:
        raise SandboxFailed(f"cannot {what}: {exc.stderr.strip()}", code="network_failed") from exc


def nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The host's IPv4 nameservers that a sandbox can reach (loopback ones cannot be)."""
    found: list[str] = []
    for candidate in (resolv_conf, Path("/run/systemd/resolve/resolv.conf")):
        try:
            lines = candidate.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    address = ipaddress.ip_address(parts[1])
                except ValueError:
                    continue
                if address.version == 4 and not address.is_loopback and parts[1] not in found:
                    found.append(parts[1])
        if found:
            break
    return tuple(found)


def addresses(index: int) -> tuple[str, str]:
    """(gateway on the host, the sandbox's address) of pool slot `index`."""
    base = int(POOL.network_address) + 4 * index
    return str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))


def host_iface(index: int) -> str:
    return f"{IFACE_PREFIX}{index:x}"


def netns_path(name: str) -> Path:
    """Where the network namespace `name` (a sandbox's id) is pinned."""
    return NETNS_DIR / name


def _query(argv: list[str]) -> str:
    """What a read-only command prints (nothing if it fails: the thing asked about is absent)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    return done.stdout


def forwarding(iface: str) -> Path:
    """The IPv4 forwarding switch of one interface (``all`` and ``default`` are left alone)."""
    return SYSCTL_DIR / iface / "forwarding"


def uplinks() -> tuple[str, ...]:
    """The interfaces of the host's IPv4 default routes."""
    out = _query(["ip", "-4", "-o", "route", "show", "default"])
    return tuple(dict.fromkeys(re.findall(r"\bdev (\S+)", out)))


def routed_by_corral() -> set[str]:
    """Uplinks whose forwarding Corral switched on (the ``routed`` set of its table)."""
    listed = _query(["nft", "list", "set", "inet", "corral", "routed"])
    elements = re.search(r"elements = \{([^}]*)\}", listed)
    return set(re.findall(r'"([^"]+)"', elements.group(1))) if elements else set()


def install_firewall(dns: tuple[str, ...]) -> None:
    """(Re)write the ``inet corral`` nftables table and turn on forwarding on the uplinks."""
    routed = routed_by_corral()
    for iface in uplinks():
        if forwarding(iface).read_text().strip() == "0":
            routed.add(iface)
    blocked = ", ".join(BLOCKED_RANGES)
    dns_rules = ""
    if dns:
        servers = ", ".join(dns)
        dns_rules = (
            f'    iifname "{IFACE_PREFIX}*" ip daddr {{ {servers} }} udp dport 53 accept\n'
            f'    iifname "{IFACE_PREFIX}*" ip daddr {{ {servers} }} tcp dport 53 accept\n'
        )
    elements = ", ".join(f'"{iface}"' for iface in sorted(routed))
    routed_set = f"    elements = {{ {elements} }}\n" if routed else ""
    ruleset = f"""
table inet corral
delete table inet corral
table inet corral {{
  set routed {{
    type ifname
{routed_set}  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname "{IFACE_PREFIX}*" drop
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname @routed oifname != "{IFACE_PREFIX}*" drop
    oifname "{IFACE_PREFIX}*" ct state established,related accept
    oifname "{IFACE_PREFIX}*" drop
    iifname "{IFACE_PREFIX}*" meta nfproto ipv6 drop
{dns_rules}    iifname "{IFACE_PREFIX}*" ip daddr {{ {blocked} }} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {POOL} oifname != "{IFACE_PREFIX}*" masquerade
  }}
}}
"""
    _run(["nft", "-f", "-"], "install the sandbox firewall", stdin=ruleset)
    for iface in routed:  # only now that the table guards what comes in on them
        if forwarding(iface).exists():
            forwarding(iface).write_text("1\n")


def create(ns: str, index: int) -> Path:
    """Make network namespace `ns` with its veth, the addresses of slot `index` of the pool and
    a default route; return its path."""
    gateway, address = addresses(index)
    iface = host_iface(index)
    destroy(ns, index)  # a leftover from a crashed engine would make every step below fail
    outside = (
        f"netns add {ns}\n"
        f"link add {iface} type veth peer name eth0 netns {ns}\n"
        f"addr add {gateway}/30 dev {iface}\n"
        f"link set {iface} up\n"
    )
    inside = (
        "link set lo up\n"
        f"addr add {address}/30 dev eth0\n"
        "link set eth0 up\n"
        f"route add default via {gateway}\n"
    )
    try:
        _run(["ip", "-batch", "-"], "set up the sandbox network", stdin=outside)
        _run(["ip", "-n", ns, "-batch", "-"], "set up the sandbox network", stdin=inside)
        forwarding(iface).write_text("1\n")
    except (SandboxFailed, OSError):
        destroy(ns, index)
        raise
    return netns_path(ns)


def destroy(ns: str, index: int) -> None:
    """Remove network namespace `ns` and the veth of slot `index`; missing ones are fine."""
    if index < 0:
        return
    subprocess.run(["ip", "link", "del", host_iface(index)], capture_output=True, check=False)
    if netns_path(ns).exists():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
