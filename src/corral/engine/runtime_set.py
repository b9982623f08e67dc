"""The runtimes an engine can use on this machine: made once, probed once, the strongest first."""

from __future__ import annotations

import os
from pathlib import Path

from corral.core.errors import RuntimeUnavailable
from corral.host.spares import SpareDisks
from corral.runtimes import PREFERENCE, Runtime, make_runtime


class RuntimeSet:
    """Runtime instances by name, with why each can or cannot run here."""

    def __init__(self, data_dir: Path, *, default: str | None, runsc: str | None) -> None:
        self._data_dir = data_dir
        self._default = default
        # CORRAL_RUNSC picks another runsc build (a path or a name on PATH).
        self._runsc = runsc or os.environ.get("CORRAL_RUNSC", "runsc")
        self._runtimes: dict[str, Runtime] = {}
        self._unavailable: dict[str, str | None] = {}
        self.spares = SpareDisks(data_dir / "spares")  # every runtime's disks (engine.spares)

    def get(self, name: str) -> Runtime:
        """The runtime called `name` (unknown names are a `RuntimeUnavailable` error)."""
        if name not in self._runtimes:
            self._runtimes[name] = make_runtime(name, self._data_dir, runsc=self._runsc)
            self._runtimes[name].spares = self.spares
        return self._runtimes[name]

    def unavailable_reason(self, name: str) -> str | None:
        """Why runtime `name` cannot run on this machine, or None if it can (probed once)."""
        if name not in self._unavailable:
            self._unavailable[name] = self.get(name).unavailable_reason()
        return self._unavailable[name]

    def check(self, name: str) -> Runtime:
        """Runtime `name` if it can run here, else a `RuntimeUnavailable` that says why."""
        runtime = self.get(name)
        reason = self.unavailable_reason(name)
        if reason is not None:
            raise RuntimeUnavailable(f"the {name} runtime cannot run on this machine: {reason}")
        return runtime

    def report(self) -> dict[str, str | None]:
        """Every runtime, strongest first, with why it cannot run here (None: it can)."""
        return {name: self.unavailable_reason(name) for name in PREFERENCE}

    @property
    def default(self) -> str:
        """The configured default, else the strongest runtime this machine can run."""
        if self._default is not None:
            return self._default
        for name in PREFERENCE:
            if self.unavailable_reason(name) is None:
                return name
        reasons = "; ".join(f"{name}: {self.unavailable_reason(name)}" for name in PREFERENCE)
        raise RuntimeUnavailable(f"no runtime can run on this machine ({reasons})")
