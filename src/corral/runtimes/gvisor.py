"""The `gvisor` runtime (work in progress)."""

from __future__ import annotations

from corral.plan import SandboxPlan
from corral.runtimes.base import Launch, Runtime


class GVisorRuntime(Runtime):
    name = "gvisor"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return "not implemented yet"

    def create(self, plan: SandboxPlan) -> None:
        raise NotImplementedError

    def start(self, plan: SandboxPlan) -> Launch:
        raise NotImplementedError

    def pause(self, plan: SandboxPlan) -> None:
        raise NotImplementedError

    def resume(self, plan: SandboxPlan) -> None:
        raise NotImplementedError

    def destroy(self, plan: SandboxPlan) -> None:
        raise NotImplementedError
