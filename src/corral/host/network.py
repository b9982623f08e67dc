"""Networking for `internet` sandboxes: a network namespace, a veth pair, NAT and a firewall.

Each internet sandbox gets a network namespace made on the host (so nothing inside can
reconfigure it), with one veth whose host end is its gateway, addresses from 100.96.0.0/16 (a
/30 each) and a default route out. One nftables table per engine (``inet corral``; see
`corral.host.scope` for engines that share a machine), then decides:

- every DNS packet a sandbox sends (to any address) is redirected to Corral's resolver on the
  host, and nothing else of a sandbox's reaches the host itself (refused at once);
- TCP of sandboxes with egress rules (the ``proxied`` set) is redirected to Corral's egress
  proxy, which decides by name and address (`corral.engine.egress`); their other traffic goes
  through a chain of their own (``sandbox_N``) that decides by address only;
- forwarded traffic with a source that is not the sandbox's own address, or that conntrack
  finds invalid, is dropped; to another sandbox, to private, link-local (cloud metadata),
  shared, multicast or reserved ranges it is refused (TCP with a reset, the rest with an ICMP
  error, so nothing hangs);
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
from collections.abc import Sequence
from pathlib import Path

from corral.core.egress import METADATA_ADDRESSES, PRIVATE_RANGES
from corral.core.errors import SandboxFailed
from corral.host.scope import PREFIXES, HostScope

POOL = ipaddress.ip_network("100.96.0.0/16")
POOL_SIZE = POOL.num_addresses // 4
NETNS_DIR = Path("/run/netns")
SYSCTL_DIR = Path("/proc/sys/net/ipv4/conf")

BLOCKED = ", ".join(
    [str(block) for block in PRIVATE_RANGES] + [str(ip) for ip in sorted(METADATA_ADDRESSES)]
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
    """The host's IPv4 nameservers (where Corral's resolver asks)."""
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
                if address.version == 4 and parts[1] not in found:
                    found.append(parts[1])
        if found:
            break
    return tuple(found)


def addresses(index: int) -> tuple[str, str]:
    """(gateway on the host, the sandbox's address) of pool slot `index`."""
    base = int(POOL.network_address) + 4 * index
    return str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))


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
    """Uplinks whose forwarding Corral switched on (the ``routed`` sets of every engine's table
    on this host: one engine's uplink is not the operator's choice to the next)."""
    tables = re.findall(r"^table inet (corral\w*)$", _query(["nft", "list", "tables"]), re.M)
    routed: set[str] = set()
    for table in tables:
        listed = _query(["nft", "list", "set", "inet", table, "routed"])
        elements = re.search(r"elements = \{([^}]*)\}", listed)
        routed.update(re.findall(r'"([^"]+)"', elements.group(1)) if elements else ())
    return routed


SandboxRules = tuple[int, tuple[str, ...], tuple[str, ...] | None]  # slot, deny, allow


def install_firewall(
    scope: HostScope, dns_port: int, proxy_port: int, rules: Sequence[SandboxRules] = ()
) -> None:
    """(Re)write the `scope`'s table (DNS sent to `dns_port`, proxied TCP to `proxy_port`)
    with each sandbox's `rules` in the same transaction, and turn on the uplinks' forwarding.

    What comes in on a routed uplink may go to any Corral engine's sandboxes (`PREFIXES`):
    every engine's table sees every forwarded packet, and none may drop another's replies."""
    routed, routed_set = _to_route()
    ruleset = _table(scope, dns_port, proxy_port, routed_set)
    ruleset += "".join(line + "\n" for slot in rules for line in _sandbox_rules(scope.table, *slot))
    _run(["nft", "-f", "-"], "install the sandbox firewall", stdin=ruleset)
    for iface in routed:  # only now that the table guards what comes in on them
        if forwarding(iface).exists():
            forwarding(iface).write_text("1\n")


def _table(scope: HostScope, dns_port: int, proxy_port: int, routed_set: str) -> str:
    """The nftables script that (re)writes the `scope`'s table, without sandboxes' rules."""
    table, ours = scope.table, f'"{scope.iface_prefix}*"'
    elsewhere = " ".join(f'oifname != "{prefix}*"' for prefix in PREFIXES)  # not a sandbox
    sandboxes = f"iifname {ours}"
    return f"""
table inet {table}
delete table inet {table}
table inet {table} {{
  set routed {{
    type ifname
{routed_set}  }}
  set proxied {{
    type ipv4_addr
  }}
  map filtered {{
    type ipv4_addr : verdict
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {sandboxes} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns_port}
    {sandboxes} ip saddr @proxied meta l4proto tcp redirect to :{proxy_port}
  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    {sandboxes} ct status dnat meta l4proto {{ tcp, udp }} th dport {dns_port} accept
    {sandboxes} ct status dnat meta l4proto tcp th dport {proxy_port} accept
    {sandboxes} meta l4proto tcp reject with tcp reset
    {sandboxes} reject with icmpx admin-prohibited
    meta l4proto {{ tcp, udp }} th dport {{ {dns_port}, {proxy_port} }} iifname != "lo" drop
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname @routed {elsewhere} drop
    oifname {ours} ct state established,related accept
    {sandboxes} oifname {ours} jump refuse
    oifname {ours} drop
    {sandboxes} meta nfproto ipv6 drop
    {sandboxes} ip saddr & 0.0.0.3 != 0.0.0.2 drop
    {sandboxes} fib saddr . iif oif missing drop
    {sandboxes} ct state invalid drop
    {sandboxes} ip daddr {{ {BLOCKED} }} jump refuse
    {sandboxes} ip saddr vmap @filtered
  }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {POOL} {elsewhere} masquerade
  }}
}}
"""


def _to_route() -> tuple[set[str], str]:
    """The uplinks Corral routes through (those it switched on before, and those still off),
    and the line of the ``routed`` set that lists them."""
    routed = routed_by_corral()
    routed.update(i for i in uplinks() if forwarding(i).read_text().strip() == "0")
    elements = ", ".join(f'"{iface}"' for iface in sorted(routed))
    return routed, f"    elements = {{ {elements} }}\n" if routed else ""


def filter_sandbox(
    scope: HostScope, index: int, deny: tuple[str, ...], allow: tuple[str, ...] | None
) -> None:
    """Send the TCP of slot `index` through the egress proxy, and let its other traffic out
    only to the `allow` blocks (None: anywhere) outside the `deny` blocks."""
    rules = _sandbox_rules(scope.table, index, deny, allow)
    _run(["nft", "-f", "-"], "apply the sandbox's network rules", stdin="\n".join(rules) + "\n")


def _sandbox_rules(
    table: str, index: int, deny: tuple[str, ...], allow: tuple[str, ...] | None
) -> list[str]:
    chain, at = f"sandbox_{index}", f"inet {table}"
    rules = [f"add chain {at} {chain}", f"flush chain {at} {chain}"]
    if deny:
        rules.append(f"add rule {at} {chain} ip daddr {{ {', '.join(deny)} }} jump refuse")
    if allow is not None:
        if allow:
            rules.append(f"add rule {at} {chain} ip daddr {{ {', '.join(allow)} }} return")
        rules.append(f"add rule {at} {chain} jump refuse")
    address = addresses(index)[1]
    rules += [
        f"add element {at} filtered {{ {address} : jump {chain} }}",
        f"add element {at} proxied {{ {address} }}",
    ]
    return rules


def unfilter_sandbox(scope: HostScope, index: int) -> None:
    """Undo `filter_sandbox` for slot `index` (nothing to undo is fine)."""
    address, at = addresses(index)[1], f"inet {scope.table}"
    for command in (
        f"delete element {at} proxied {{ {address} }}",
        f"delete element {at} filtered {{ {address} }}",
        f"delete chain {at} sandbox_{index}",
    ):
        subprocess.run(["nft", command], capture_output=True, check=False, timeout=30)


def slot_of(address: str) -> int | None:
    """The pool slot whose sandbox has `address` (None: not a sandbox's address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version != 4 or ip not in POOL:
        return None
    offset = int(ip) - int(POOL.network_address)
    return offset // 4 if offset % 4 == 2 else None


def host_addresses() -> frozenset[str]:
    """The host's own IPv4 addresses (a sandbox reaches none of them)."""
    out = _query(["ip", "-4", "-o", "addr", "show"])
    return frozenset(re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out))


def create(ns: str, index: int, scope: HostScope) -> Path:
    """Make network namespace `ns` with its veth, the addresses of slot `index` of the pool and
    a default route; return its path."""
    gateway, address = addresses(index)
    iface = scope.iface(index)
    destroy(ns, index, scope)  # a leftover from a crashed engine would make every step below fail
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
        destroy(ns, index, scope)
        raise
    return netns_path(ns)


def destroy(ns: str, index: int, scope: HostScope) -> None:
    """Remove network namespace `ns` and the veth of slot `index`; missing ones are fine."""
    if index < 0:
        return
    subprocess.run(["ip", "link", "del", scope.iface(index)], capture_output=True, check=False)
    if netns_path(ns).exists():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
