"""Where the server may connect when it pulls an image: public addresses, and the registries its
operator allows by name. Nothing else, whatever a reference, a redirect or a token realm says.

The server runs as root inside the host's network, so a pull is a request a tenant makes the
host send: to its loopback services, the private network, cloud metadata addresses. Every
connection of a pull (the registry, each redirect, each token realm) goes through
`GuardedBackend`, which resolves the name itself, keeps only the addresses the policy allows,
and connects to one of those (never re-resolving, so a DNS answer cannot change in between).
A refused name gets one answer, the same whether something listens behind it or not.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpcore
import httpx

REFUSED = "refused by the registry egress policy"
# Cloud providers' own services on addresses the internet also routes: never a registry.
PROVIDER_SERVICES = frozenset({ipaddress.ip_address("168.63.129.16")})  # Azure's wire server


@dataclass(frozen=True)
class Egress:
    """The pull policy: public addresses, plus the registries in `allowed` (`host` or
    `host:port`, as in an image reference), which may be anywhere (a private registry)."""

    allowed: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, names: Iterable[str]) -> Egress:
        return cls(frozenset(name.strip().lower() for name in names if name.strip()))

    @classmethod
    def from_environment(cls) -> Egress:
        """The policy `CORRAL_ALLOWED_REGISTRIES` (comma-separated names) sets."""
        return cls.of(os.environ.get("CORRAL_ALLOWED_REGISTRIES", "").split(","))

    def names(self, host: str, port: int) -> bool:
        """Whether the operator allows `host:port` by name."""
        host = host.lower().strip("[]")
        return (
            host in self.allowed
            or f"{host}:{port}" in self.allowed
            or (f"[{host}]:{port}" in self.allowed)
        )


def is_public(address: str) -> bool:
    """Whether `address` is one the internet routes: not loopback, private, link-local (cloud
    metadata lives there), shared, reserved, multicast or a provider's service address, IPv4
    inside IPv6 included."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast and ip not in PROVIDER_SERVICES


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's network backend, connecting only where the `Egress` policy allows."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        named = self._egress.names(host, port)
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = [str(entry[4][0]) for entry in found]
        allowed = [address for address in addresses if named or is_public(address)]
        if not allowed:
            raise httpcore.ConnectError(REFUSED)
        last: Exception | None = None
        for address in allowed:
            try:
                return self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError(REFUSED)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport over a `GuardedBackend`. (httpx offers no setting for the network
    backend; its connection pool is the one thing replaced, tested in tests/integration.)"""

    def __init__(self, egress: Egress) -> None:
        super().__init__(trust_env=False)  # a proxy from the environment would connect for us
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            network_backend=GuardedBackend(egress),
        )
