"""A start undone half-way leaves nothing behind, whoever undoes it: a create that is cancelled,
a sandbox terminated while it is built, a pool removed while it fills.

The runtime's build (in a worker thread) is held at its start until the test lets it go, so
the undo always comes while the build is under way. Before the fix, the undo ran beside the
build: it deleted the sandbox's record, then the build mounted its disk and overlay, which no
engine could find again. Real namespaces sandboxes; the only bounds on time catch hangs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.core.errors import SandboxEnded
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.engine import Engine
from corral.runtimes.plan import SandboxPlan
from tests.conftest import leftovers, require_runtime, wait_until


class HeldBuilds:
    """Every namespaces build waits for `release` once it has begun (`entered`)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    async def wait_entered(self) -> None:
        await wait_until(self.entered.is_set, "a build has begun")


@pytest.fixture
def held(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldBuilds]:
    require_runtime("namespaces")
    runtime = engine.runtimes.get("namespaces")
    build = runtime.build
    holding = HeldBuilds()

    def held_build(plan: SandboxPlan) -> None:
        holding.entered.set()
        holding.release.wait(60)
        try:
            build(plan)
        finally:
            holding.finished.set()

    monkeypatch.setattr(runtime, "build", held_build)
    yield holding
    holding.release.set()  # never leave a worker thread waiting


async def nothing_left(engine: Engine, data_dir: Path, held: HeldBuilds) -> None:
    await wait_until(held.finished.is_set, "the held build has finished")
    await wait_until(lambda: not any(leftovers(data_dir).values()), "nothing is left")
    assert [r for r in engine.registry if r.alive] == []


async def test_a_cancelled_create_undoes_its_build_once_the_build_is_done(
    engine: Engine, data_dir: Path, held: HeldBuilds
) -> None:
    create = asyncio.ensure_future(engine.create(SandboxSpec(runtime="namespaces"), pool=False))
    await held.wait_entered()
    create.cancel()
    await asyncio.sleep(0.2)  # the undo would have run by now, beside the build
    assert not create.done()  # it waits for the build
    held.release.set()
    with pytest.raises(asyncio.CancelledError):
        await create
    await nothing_left(engine, data_dir, held)


async def test_a_sandbox_terminated_while_it_is_built_never_starts(
    engine: Engine, data_dir: Path, held: HeldBuilds
) -> None:
    create = asyncio.ensure_future(engine.create(SandboxSpec(runtime="namespaces"), pool=False))
    await held.wait_entered()
    creating = next(r for r in engine.registry if r.alive)
    terminate = asyncio.ensure_future(engine.terminate(creating.id))
    await asyncio.sleep(0.2)
    assert not terminate.done()  # it waits for the build, then undoes all of it
    held.release.set()
    ended = await terminate
    assert ended.state is SandboxState.TERMINATED
    with pytest.raises(SandboxEnded):
        await create
    assert creating.launch is None  # its runtime was never started
    await nothing_left(engine, data_dir, held)


async def test_a_pool_removed_while_it_fills_leaves_nothing(
    engine: Engine, data_dir: Path, held: HeldBuilds
) -> None:
    engine.configure_pool("racing", SandboxSpec(runtime="namespaces"), 1)
    await held.wait_entered()
    engine.remove_pool("racing")
    await asyncio.sleep(0.2)
    held.release.set()
    await nothing_left(engine, data_dir, held)
