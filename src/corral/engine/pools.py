"""Warm pools: started, idle sandboxes of one configuration, claimed by `create` to hide the
start latency.

A pool is a template spec (image, runtime and resources: what is fixed when a sandbox starts)
and a target size. A request whose spec matches a pool's template on those fields takes an idle
sandbox from it; what may differ per request (env, metadata, workdir, lifetime) is applied at
claim time, so a claimed sandbox looks exactly like one created for the request. Idle sandboxes
are invisible: not listed, not reachable by id, never used before they are claimed.

Pools refill one sandbox at a time, only while no user's create is in flight and in the gaps of
use (`PoolKeeper.quiet`), so filling competes as little as it can with live traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from corral.core.errors import CorralError, InvalidRequest, NotFound
from corral.core.models import SandboxInfo
from corral.core.spec import FIXED_AT_START, SandboxSpec
from corral.core.state import EndReason
from corral.engine.access import Access
from corral.engine.interpreter import CODE_IMAGE, prestart
from corral.engine.lifecycle import Lifecycle
from corral.engine.record import Phase
from corral.engine.registry import Registry
from corral.engine.runtime_set import RuntimeSet
from corral.engine.spares import SpareKeeper

log = logging.getLogger("corral.engine.pools")

MAX_POOL_SIZE = 1000
FILL_RETRY_DELAY = 5.0  # after a failed fill, so a broken template does not spin
# Pools refill in the gaps of live traffic: once no sandbox has been used for FILL_QUIET seconds,
# or after FILL_MAX_DEFER seconds of continuous use, so a busy server's pools still refill.
# Starting a sandbox costs ~100 ms of CPU; on a small machine a refill running beside a user's
# commands doubles their latency, which is what the pool is there to cut.
FILL_QUIET = 0.1
FILL_MAX_DEFER = 1.0
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def pool_key(spec: SandboxSpec) -> tuple[Any, ...]:
    return tuple(getattr(spec, name) for name in FIXED_AT_START)


@dataclass
class Pool:
    """One pool: its template, target size, idle sandboxes and counters."""

    name: str
    template: SandboxSpec
    size: int
    idle: deque[str] = field(default_factory=deque)
    hits: int = 0
    misses: int = 0
    failures: int = 0
    last_error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **{name: getattr(self.template, name) for name in FIXED_AT_START},
            "size": self.size,
            "idle": len(self.idle),
            "hits": self.hits,
            "misses": self.misses,
            "failures": self.failures,
            "last_error": self.last_error,
        }


# The engine's side, as the pools need it.
Fill = Callable[[SandboxSpec], Awaitable[str]]  # start an idle sandbox; its id
Alive = Callable[[str], bool]  # is this idle sandbox still usable?
Discard = Callable[[str], Awaitable[None]]  # end an idle sandbox
Quiet = Callable[[], Awaitable[Any]]  # returns when a fill would not slow live traffic


class Pools:
    """Every pool of one engine (see `Engine.configure_pool`)."""

    def __init__(self, fill: Fill, alive: Alive, discard: Discard, quiet: Quiet) -> None:
        self._fill = fill
        self._alive = alive
        self._discard = discard
        self._quiet = quiet
        self._pools: dict[str, Pool] = {}
        self._fillers: dict[str, asyncio.Task[None]] = {}
        self._filling = asyncio.Lock()  # one fill at a time across all pools

    def configure(self, name: str, template: SandboxSpec, size: int) -> Pool:
        """Create or replace pool `name`; its filler starts at once."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(
                "a pool's name must be 1 to 64 lowercase letters, digits, '.', '_' or '-'"
            )
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_POOL_SIZE:
            raise InvalidRequest(f"a pool's size must be 0 to {MAX_POOL_SIZE}")
        assert template.runtime is not None, "the engine names the runtime"
        old = self._pools.get(name)
        pool = Pool(name, template, size)
        if old is not None and pool_key(old.template) == pool_key(template):
            pool.hits, pool.misses = old.hits, old.misses
            while old.idle and len(pool.idle) < size:  # keep what fits, end the excess
                pool.idle.append(old.idle.popleft())
        if old is not None:
            self._drain(old)
        self._pools[name] = pool
        self._restart_filler(pool)
        return pool

    def remove(self, name: str) -> None:
        pool = self._pools.pop(name, None)
        if pool is None:
            raise NotFound(f"no pool {name!r}", code="pool_not_found")
        filler = self._fillers.pop(name, None)
        if filler is not None:
            filler.cancel()
        self._drain(pool)

    def list(self) -> list[Pool]:
        return list(self._pools.values())

    def claim(self, spec: SandboxSpec) -> str | None:
        """An idle sandbox matching `spec`, taken out of its pool; None if none is ready."""
        key = pool_key(spec)
        matching = [pool for pool in self._pools.values() if pool_key(pool.template) == key]
        for pool in matching:
            while pool.idle:
                sandbox_id = pool.idle.popleft()
                if self._alive(sandbox_id):
                    pool.hits += 1
                    pool.changed.set()
                    return sandbox_id
        if matching:
            matching[0].misses += 1
            matching[0].changed.set()
        return None

    async def close(self) -> None:
        """Stop filling and end every idle sandbox."""
        for filler in self._fillers.values():
            filler.cancel()
        for filler in self._fillers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await filler
        self._fillers.clear()
        idle = [sandbox_id for pool in self._pools.values() for sandbox_id in pool.idle]
        for pool in self._pools.values():
            pool.idle.clear()
        await asyncio.gather(*(self._discard(i) for i in idle), return_exceptions=True)

    def _drain(self, pool: Pool) -> None:
        idle = list(pool.idle)
        pool.idle.clear()
        for sandbox_id in idle:
            asyncio.ensure_future(self._discard(sandbox_id)).add_done_callback(_log_failure)

    def _restart_filler(self, pool: Pool) -> None:
        old = self._fillers.pop(pool.name, None)
        if old is not None:
            old.cancel()
        self._fillers[pool.name] = asyncio.create_task(self._keep_filled(pool))

    async def _keep_filled(self, pool: Pool) -> None:
        while True:
            pool.idle = deque(i for i in pool.idle if self._alive(i))
            if len(pool.idle) >= pool.size:
                pool.changed.clear()
                await pool.changed.wait()
                continue
            async with self._filling:
                await self._quiet()  # users first: fill only while no create is waiting
                try:
                    sandbox_id = await self._fill(pool.template)
                except CorralError as exc:
                    pool.failures += 1
                    pool.last_error = f"{exc.code}: {exc.message}"
                    log.warning("filling pool %s failed: %s", pool.name, exc.message)
                    await asyncio.sleep(FILL_RETRY_DELAY)
                    continue
            if self._pools.get(pool.name) is pool:
                pool.idle.append(sandbox_id)
            else:  # reconfigured or removed while filling
                await self._discard(sandbox_id)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ending an idle pooled sandbox failed", exc_info=task.exception())


class PoolKeeper:
    """The engine's side of warm pools: starts idle sandboxes for them, hands them to creates,
    and fills them only in the gaps of live traffic."""

    def __init__(
        self, *, registry: Registry, runtimes: RuntimeSet, lifecycle: Lifecycle, access: Access
    ) -> None:
        self._registry = registry
        self._runtimes = runtimes
        self._lifecycle = lifecycle
        self._access = access
        self._user_creates = 0  # in flight; pools fill only while there are none
        self._no_user_creates = asyncio.Event()
        self._no_user_creates.set()
        self.pools = Pools(
            fill=self._fill, alive=self._alive, discard=self._discard, quiet=self.quiet
        )
        lifecycle.boots.start(self.quiet)  # boot images are made in the same gaps
        self.spares = SpareKeeper(runtimes.spares, self.quiet)  # and spare disks

    def configure(self, name: str, template: SandboxSpec, size: int) -> dict[str, Any]:
        if template.volumes:
            raise InvalidRequest("a pool's sandboxes cannot mount volumes; create those directly")
        runtime = self._runtimes.check(template.runtime or self._runtimes.default)
        return self.pools.configure(name, template.with_runtime(runtime.name), size).to_dict()

    def claim(self, spec: SandboxSpec) -> SandboxInfo | None:
        """An idle sandbox for `spec`, given its spec, a fresh history and deadline; None if
        no pool has one ready."""
        claimed = self.pools.claim(spec)
        if claimed is None:
            return None
        record = self._registry.find(claimed)
        assert record is not None  # `alive` checked it
        self._access.last_use = time.monotonic()
        # Thawed where idle ones are frozen; its plan keeps the pool's CPU weight, the cgroup,
        # which is what counts, gets the normal one.
        self._runtimes.get(record.runtime).set_pooled(record.plan, False)
        record.start_lifetime(spec)
        return record.info()

    async def take(self, spec: SandboxSpec) -> SandboxInfo | None:
        """`claim`, with an internet sandbox's egress rules (not its template's) in force."""
        start = time.perf_counter()
        claimed = self.claim(spec)
        if claimed is None:
            return None
        record = self._registry.get(claimed.id)
        record.timings = {"pool_claim": time.perf_counter() - start}  # its start was the pool's
        if spec.network == "internet":
            try:
                await self._lifecycle.apply_egress(record)
            except BaseException:
                await self._lifecycle.end(record, EndReason.RUNTIME_ERROR, "egress rules failed")
                raise
            record.timings["egress_rules"] = time.perf_counter() - start
        return claimed

    async def close(self) -> None:
        """Stop filling pools and making spare disks; end every idle pooled sandbox."""
        await self.pools.close()
        await self.spares.stop()

    @contextlib.asynccontextmanager
    async def user_create(self) -> AsyncIterator[None]:
        """Hold pool fills back while the block (a user's create) runs."""
        self._user_creates += 1
        self._no_user_creates.clear()
        try:
            yield
        finally:
            self._user_creates -= 1
            if not self._user_creates:
                self._no_user_creates.set()
            self.spares.want()

    async def quiet(self) -> None:
        """Return when a pool may start a sandbox: no create in flight, a gap in use."""
        give_up = time.monotonic() + FILL_MAX_DEFER
        while True:
            await self._no_user_creates.wait()
            wait = min(self._access.last_use + FILL_QUIET, give_up) - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _fill(self, template: SandboxSpec) -> str:
        assert template.runtime is not None
        runtime = self._runtimes.check(template.runtime)
        record = await self._lifecycle.start(template, runtime, None, for_pool=True)
        self.spares.want()
        if template.image == CODE_IMAGE:  # its first run_code finds an interpreter running
            await prestart(record)
        await asyncio.to_thread(runtime.set_pooled, record.plan, True)
        record.move(Phase.POOLED)
        return record.id

    def _alive(self, sandbox_id: str) -> bool:
        record = self._registry.find(sandbox_id)
        return record is not None and record.phase is Phase.POOLED and record.link.connected

    async def _discard(self, sandbox_id: str) -> None:
        record = self._registry.find(sandbox_id)
        if record is not None:
            await self._lifecycle.end(
                record, EndReason.ENGINE_SHUTDOWN, "idle pooled sandbox released"
            )
