"""The runtimes Corral can run sandboxes with, and which of them this machine supports."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from corral.core.errors import RuntimeUnavailable
from corral.runtimes.base import Launch, Runtime
from corral.runtimes.gvisor import GVisorRuntime
from corral.runtimes.namespaces import NamespacesRuntime

RUNTIMES: dict[str, type[Runtime]] = {
    NamespacesRuntime.name: NamespacesRuntime,
    GVisorRuntime.name: GVisorRuntime,
}

# The strongest isolation the machine offers is the default.
PREFERENCE = (GVisorRuntime.name, NamespacesRuntime.name)


def make_runtime(name: str, data_dir: Path, *, runsc: str = "runsc") -> Runtime:
    """An instance of runtime `name` for an engine whose data lives in `data_dir`."""
    if name not in RUNTIMES:
        raise RuntimeUnavailable(
            f"unknown runtime {name!r}; choose one of: {', '.join(sorted(RUNTIMES))}",
            code="unknown_runtime",
        )
    if name == GVisorRuntime.name:
        return GVisorRuntime(data_dir, runsc=runsc)
    return RUNTIMES[name](data_dir)


@functools.cache
def unavailable_reason(name: str) -> str | None:
    """Why runtime `name`, with default settings, cannot run here (None if it can)."""
    runsc = os.environ.get("CORRAL_RUNSC", "runsc")
    return make_runtime(name, Path(tempfile.gettempdir()), runsc=runsc).unavailable_reason()


__all__ = [
    "PREFERENCE",
    "RUNTIMES",
    "GVisorRuntime",
    "Launch",
    "NamespacesRuntime",
    "Runtime",
    "make_runtime",
    "unavailable_reason",
]
