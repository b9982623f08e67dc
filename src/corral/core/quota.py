"""Per-key quotas: what one API key's sandboxes, volumes, snapshots and uploads may take.

A quota field of None is no limit. The same shape holds a key's usage (every field a number).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.core.errors import InvalidRequest

UNITS = {
    "cpu": "CPUs",
    "memory_mb": "MiB of memory",
    "disk_mb": "MiB of disk",
    "volume_mb": "MiB of volumes",
    "snapshot_bytes": "bytes of snapshots",
    "blob_bytes": "bytes of uploads",
}


@dataclass(frozen=True)
class Quota:
    """Limits (None: none) or usage: live sandboxes' CPU, memory and disk; volumes, snapshots
    and uploaded content."""

    cpu: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    volume_mb: int | None = None
    snapshot_bytes: int | None = None
    blob_bytes: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Quota:
        """A quota from JSON; unknown fields and negative or non-numeric values are refused."""
        unknown = set(data) - set(UNITS)
        if unknown:
            raise InvalidRequest(
                f"unknown quota field {min(unknown)!r}: use {', '.join(UNITS)}",
                code="invalid_quota",
            )
        for name, value in data.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and (not numeric or value < 0 or value > 2**62):
                raise InvalidRequest(
                    f"quota {name} must be a number of {UNITS[name]} from 0, or null for none",
                    code="invalid_quota",
                )
        typed: dict[str, Any] = {name: _typed(name, value) for name, value in data.items()}
        return cls(**typed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plus(self, other: Quota) -> Quota:
        """Usage `self` with `other` added (None counts as 0)."""
        return Quota(**{n: (getattr(self, n) or 0) + (getattr(other, n) or 0) for n in UNITS})

    def exceeded_by(self, usage: Quota) -> str | None:
        """The first of this quota's limits that `usage` goes past, in words; None if none."""
        for name, unit in UNITS.items():
            limit, used = getattr(self, name), getattr(usage, name) or 0
            if limit is not None and used > limit:
                return f"{name}: {used:g} {unit} asked for, the quota is {limit:g}"
        return None


def _typed(name: str, value: Any) -> float | int | None:
    if value is None:
        return None
    return float(value) if name == "cpu" else int(value)
