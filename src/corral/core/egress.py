"""Where an internet sandbox may connect: allow and deny rules, and the decision they make.

A rule is a host name (``api.example.com``), a wildcard for every name below one
(``*.example.org``, not ``example.org`` itself), or an IPv4 address or CIDR block
(``203.0.113.0/24``). A policy has an optional allow list (absent: everything not denied) and a
deny list; a deny always wins. The operator's floor is a policy of the same shape that every
sandbox's connection must pass as well, so no key can widen it.

What is checked against the rules (see `corral.engine.egress` for where): DNS questions by name,
TCP to ports 80 and 443 by the TLS SNI or HTTP Host name and the address Corral resolves for it,
everything else by address (an address counts as a name the sandbox resolved to it through
Corral). Private, loopback, link-local, shared and reserved addresses and cloud metadata
services are denied whatever the rules say.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.core.errors import InvalidRequest

MAX_RULES = 256  # per list

# Never reachable from a sandbox: the host's and the provider's networks. (The internet routes
# the documentation ranges, which some networks use for real services, so they stay reachable.)
PRIVATE_RANGES = tuple(
    ipaddress.ip_network(block)
    for block in (
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
)
# Cloud metadata and provider services, the public ones included (Azure's wire server).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "168.63.129.16", "100.100.100.200")
)

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule, as written (``text``) and as parsed."""

    text: str
    name: str | None = None  # exact name, or the suffix after "*." for a wildcard
    wildcard: bool = False
    block: ipaddress.IPv4Network | None = None

    @classmethod
    def parse(cls, value: Any) -> Rule:
        if isinstance(value, Rule):
            return value
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(
                f"network rule {value!r} is not a string; use a host name such as "
                "'api.example.com', a wildcard such as '*.example.org' or a CIDR such as "
                "'203.0.113.0/24'",
                code="invalid_network_rule",
            )
        text = value.strip().lower().rstrip(".")
        try:
            block = ipaddress.ip_network(text, strict=False)
        except ValueError:
            pass
        else:
            if block.version != 4:
                raise InvalidRequest(
                    f"network rule {value!r} is IPv6; sandboxes have IPv4 only, so give an "
                    "IPv4 address or block",
                    code="invalid_network_rule",
                )
            return cls(str(block), block=block)
        wildcard = text.startswith("*.")
        name = text[2:] if wildcard else text
        labels = name.split(".")
        if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
            raise InvalidRequest(
                f"network rule {value!r} is neither a host name (letters, digits, '-' and '.', "
                "optionally starting with '*.' for every name below one) nor an IPv4 address "
                "or CIDR block",
                code="invalid_network_rule",
            )
        if not wildcard and all(label.isdigit() for label in labels):
            raise InvalidRequest(
                f"network rule {value!r} is not a valid IPv4 address", code="invalid_network_rule"
            )
        return cls(text, name=name, wildcard=wildcard)

    def matches_name(self, name: str) -> bool:
        if self.name is None:
            return False
        if self.wildcard:
            return name.endswith("." + self.name)
        return name == self.name

    def matches(self, names: Iterable[str], address: ipaddress.IPv4Address | None) -> bool:
        if self.block is not None:
            return address is not None and address in self.block
        return any(self.matches_name(name) for name in names)


@dataclass(frozen=True)
class Denial:
    """Why a destination was refused: the rule (as written, with its list) that decided, and
    whether a rule denies it (`definite`) or no rule allows it (another way may still be
    allowed: an address by block where its name is not)."""

    rule: str
    reason: str = "denied_by_policy"
    definite: bool = True


def _rules(value: Any, what: str) -> tuple[Rule, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | frozenset | set):
        raise InvalidRequest(
            f"network {what} must be a list of rules such as ['api.example.com']",
            code="invalid_network_rule",
        )
    if len(value) > MAX_RULES:
        raise InvalidRequest(
            f"network {what} has {len(value)} rules; at most {MAX_RULES}",
            code="invalid_network_rule",
        )
    return tuple(dict.fromkeys(Rule.parse(rule) for rule in value))


@dataclass(frozen=True)
class EgressPolicy:
    """Allow and deny rules. `allow=None` allows everything not denied; `allow=()` nothing."""

    allow: tuple[Rule, ...] | None = None
    deny: tuple[Rule, ...] = ()

    @classmethod
    def parse(cls, value: Any) -> EgressPolicy:
        """A policy from itself or from plain data ``{"allow": [...] | null, "deny": [...]}``."""
        if isinstance(value, EgressPolicy):
            return value
        if not isinstance(value, Mapping):
            raise InvalidRequest(
                "network rules must be an object {allow: [...], deny: [...]}",
                code="invalid_network_rule",
            )
        unknown = sorted(map(str, set(value) - {"allow", "deny"}))
        if unknown:
            raise InvalidRequest(
                f"unknown field(s) {', '.join(unknown)} in network rules; known: allow, deny",
                code="invalid_network_rule",
            )
        allow = value.get("allow")
        return cls(
            allow=None if allow is None else _rules(allow, "allow"),
            deny=_rules(value.get("deny") or (), "deny"),
        )

    @property
    def restricts(self) -> bool:
        """Whether this policy refuses anything beyond the always-denied addresses."""
        return self.allow is not None or bool(self.deny)

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow": None if self.allow is None else [rule.text for rule in self.allow],
            "deny": [rule.text for rule in self.deny],
        }

    def blocks(self, *, allowed: bool) -> tuple[str, ...]:
        """The CIDR blocks among the allow (`allowed`) or deny rules."""
        rules = (self.allow or ()) if allowed else self.deny
        return tuple(rule.text for rule in rules if rule.block is not None)

    def refusal(
        self, names: Sequence[str], address: ipaddress.IPv4Address | None, label: str = ""
    ) -> Denial | None:
        """The denial of a connection to `address` (None: not known yet) known by `names`."""
        for rule in self.deny:
            if rule.matches(names, address):
                return Denial(f"{label}deny {rule.text}")
        if self.allow is None or any(rule.matches(names, address) for rule in self.allow):
            return None
        return Denial(f"{label}not in the allow list", definite=False)


def always_denied(address: ipaddress.IPv4Address) -> Denial | None:
    """The denial every sandbox gets for `address`, whatever its rules say."""
    if address in METADATA_ADDRESSES:
        return Denial("always denied: cloud metadata service")
    if any(address in block for block in PRIVATE_RANGES):
        return Denial("always denied: private, loopback or link-local address")
    return None


def decide(
    own: EgressPolicy,
    floor: EgressPolicy,
    names: Sequence[str],
    address: ipaddress.IPv4Address | None,
) -> Denial | None:
    """Whether a sandbox with policy `own`, under the operator's `floor`, may connect to
    `address` known by `names` (None: allowed)."""
    if address is not None and (denied := always_denied(address)) is not None:
        return denied
    return floor.refusal(names, address, "operator ") or own.refusal(names, address)


def normal_name(name: str) -> str:
    """A DNS name as rules compare it: lower case, no trailing dot."""
    return name.strip().lower().rstrip(".")
