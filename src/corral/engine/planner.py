"""Planning: a spec and a resolved image become a `SandboxPlan`, with host resources (a uid
range, an address) that no live sandbox holds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from corral.core.errors import SandboxFailed
from corral.core.ids import new_id
from corral.core.spec import SandboxSpec
from corral.host import network, userns
from corral.host.scope import HostScope
from corral.images.store import RootImage
from corral.runtimes.plan import Bind, PlanLimits, PlanNetwork, PlanVolume, SandboxPlan

MiB = 1024 * 1024
DEFAULT_WORKDIR = "/root"


def plan_sandbox(
    spec: SandboxSpec,
    image: RootImage,
    *,
    data_dir: Path,
    live: Sequence[SandboxPlan],
    volume_mountpoint: Callable[[str], Path],
    scope: HostScope,
    cpu_weight: int = 100,
    template: bool = False,
    sandbox_id: str | None = None,
) -> SandboxPlan:
    """The plan of a new sandbox for `spec` on `image`, beside the `live` sandboxes' plans, in
    the engine's `scope` of the host; under a new id, or `sandbox_id` (one moving here from
    another node)."""
    assert spec.runtime is not None  # the engine names it before planning
    sandbox_id = sandbox_id or new_id("sb")
    return SandboxPlan(
        sandbox_id=sandbox_id,
        runtime=spec.runtime,
        directory=str(data_dir / "sandboxes" / sandbox_id),
        layers=tuple(str(layer) for layer in image.layers),
        binds=tuple(Bind(str(b.source), b.target) for b in image.binds),
        env=dict(image.env),  # the image's defaults; each command adds its spec's env
        workdir=image.workdir or DEFAULT_WORKDIR,
        limits=PlanLimits(
            cpu=spec.cpu,
            memory_bytes=spec.memory_mb * MiB,
            disk_bytes=spec.disk_mb * MiB,
            max_processes=spec.max_processes,
            tmp_bytes=min(spec.disk_mb, spec.memory_mb // 2) * MiB,
            cpu_weight=cpu_weight,
        ),
        network=_network(spec, live, scope),
        uid_slot=userns.pick_slot({plan.uid_slot for plan in live}, scope.share(userns.SLOTS)),
        agent_dir=str(data_dir / "agent"),
        hostname=sandbox_id,
        template=template,
        volumes=tuple(
            PlanVolume(m.volume, str(volume_mountpoint(m.volume)), m.path, m.read_only)
            for m in spec.volumes
        ),
        scope=scope.index,
    )


def _network(spec: SandboxSpec, live: Sequence[SandboxPlan], scope: HostScope) -> PlanNetwork:
    if spec.network != "internet":
        return PlanNetwork(spec.network)
    used = {plan.network.index for plan in live}
    free = next((i for i in scope.share(network.POOL_SIZE) if i not in used), None)
    if free is None:
        raise SandboxFailed("no free address for another internet sandbox", code="capacity")
    return PlanNetwork("internet", free, (network.addresses(free)[0],))  # Corral's resolver
