"""The runtimes Corral can run sandboxes with, and which of them this machine supports."""

from __future__ import annotations

import functools

from corral.errors import RuntimeUnavailable
from corral.runtimes.base import Launch, Runtime
from corral.runtimes.gvisor import GVisorRuntime
from corral.runtimes.namespaces import NamespacesRuntime

RUNTIMES: dict[str, type[Runtime]] = {
    NamespacesRuntime.name: NamespacesRuntime,
    GVisorRuntime.name: GVisorRuntime,
}

# The strongest isolation the machine offers is the default.
PREFERENCE = (GVisorRuntime.name, NamespacesRuntime.name)


@functools.cache
def unavailable_reason(name: str) -> str | None:
    """None if runtime `name` works on this machine, else why not (probed once per process)."""
    return RUNTIMES[name].unavailable_reason()


def check_runtime(name: str) -> str:
    """`name` if it is a runtime this machine can run, else a `RuntimeUnavailable` error."""
    if name not in RUNTIMES:
        raise RuntimeUnavailable(
            f"unknown runtime {name!r}; choose one of: {', '.join(sorted(RUNTIMES))}",
            code="unknown_runtime",
        )
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeUnavailable(f"the {name} runtime cannot run on this machine: {reason}")
    return name


def default_runtime() -> str:
    """The first available runtime in order of preference."""
    for name in PREFERENCE:
        if unavailable_reason(name) is None:
            return name
    reasons = "; ".join(f"{name}: {unavailable_reason(name)}" for name in PREFERENCE)
    raise RuntimeUnavailable(f"no runtime can run on this machine ({reasons})")


__all__ = [
    "PREFERENCE",
    "RUNTIMES",
    "GVisorRuntime",
    "Launch",
    "NamespacesRuntime",
    "Runtime",
    "check_runtime",
    "default_runtime",
    "unavailable_reason",
]
