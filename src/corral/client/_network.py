"""`Network`: where an internet sandbox may connect, as the SDK gives and reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corral.core.egress import EgressPolicy


@dataclass(frozen=True)
class Network:
    """Internet access with egress rules (see docs/network.md).

    `allow` lists host names (``api.example.com``), wildcards for every name below one
    (``*.example.org``) and IPv4 addresses or CIDR blocks; None allows everything not denied.
    `deny` always wins. The operator's floor (cloud metadata, private addresses, and whatever
    the operator denies) holds whatever the rules say. Rules are checked here as well as on the
    server, so a typo raises `InvalidRequest` at once.

    Example:
        >>> sandbox = corral.Sandbox.create(network=corral.Network(allow=["pypi.org"]))
        >>> sandbox.set_network(corral.Network(allow=["pypi.org", "*.pythonhosted.org"]))
    """

    allow: Sequence[str] | None = None
    deny: Sequence[str] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", None if self.allow is None else tuple(self.allow))
        object.__setattr__(self, "deny", tuple(self.deny))
        EgressPolicy.parse(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"allow": None if self.allow is None else list(self.allow), "deny": list(self.deny)}

    @classmethod
    def of(cls, policy: EgressPolicy | None) -> Network:
        """The rules of a sandbox's spec (None: internet with no rules of its own)."""
        if policy is None:
            return cls()
        data = policy.to_dict()
        return cls(allow=data["allow"], deny=data["deny"])
