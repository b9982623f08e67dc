"""The service: one node's engine and store behind the HTTP API, kept in agreement.

It owns the engine, the store and the image builder; records every sandbox's owner and each
change of its state in the store (in order, off the request path); tells owners' event streams;
counts live sandboxes against the limits; and on start reconciles the store with what the
engine re-adopted: sandboxes that did not survive a restart are marked ended with the reason,
sandboxes nobody owns are ended. What a tenant may see and touch is decided in one place,
`corral.server.tenancy`; nothing here trusts an id a request sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from corral.core.egress import EgressPolicy
from corral.core.errors import CorralError, LimitReached, SandboxNotFound
from corral.core.models import SandboxInfo, StateChange
from corral.core.quota import Quota
from corral.core.spec import SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.engine import Engine, HostScope, favor_dynamic_changes
from corral.engine.egress import EgressSettings
from corral.images.builder import Builder
from corral.images.oci.egress import Egress
from corral.server.admission import Admission, machine_capacity
from corral.server.audit import AuditLog
from corral.server.config import ServerConfig
from corral.server.events import EventHub
from corral.server.metrics import EGRESS_DENIED, WAKE_SECONDS
from corral.server.owners import OwnerJournal
from corral.server.previews.grants import Grants
from corral.server.store import ENDED_RETENTION, Store
from corral.server.throttle import FailedLogins, InFlight
from corral.server.webhooks import Webhooks

log = logging.getLogger("corral.server")

PRUNE_EVERY = 3600.0
REVOKED_EVERY = 5.0  # seconds between looks for keys revoked by another process
# Seconds a sandbox change waits before the store has it (`_write_loop`), where the store is
# this server's own: a store other servers read (a cluster's, or one named by --database-url)
# is written at once.
WRITE_LINGER = 0.05


class Service:
    """The engine, the store and the builder of one node, and the bookkeeping between them."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine = Engine(
            config.data_dir,
            default_runtime=config.default_runtime,
            on_change=self._changed,
            at_rest_key=config.at_rest_key,
            boot_images=config.boot_images,
            scope=HostScope(config.host_scope),
            node=config.node_name,
            start_limit=config.start_limit,
            doze_after=config.doze_after,
            egress=EgressSettings(
                config.egress_floor, config.dns_upstream or None, self._egress_denied
            ),
        )
        self.builder = Builder(self.engine, Egress.of(config.allowed_registries))
        self.events = EventHub()
        self.failed_logins = FailedLogins(config.auth_failures_per_minute)
        self.grants = Grants(lambda: self.store.previews)  # who may use which preview
        self.in_flight = InFlight()
        self.audit = AuditLog(config.audit_retention)
        self.quotas: dict[str, Quota] = {}  # by key id; set by admins, reread every few seconds
        self.key_networks: dict[str, EgressPolicy] = {}  # default egress rules, the same way
        self.admission = Admission(
            self.engine,
            machine_capacity(
                config.data_dir,
                config.cpu_overcommit,
                config.memory_overcommit,
                config.disk_overcommit,
            ),
        )
        self._store: Store | None = None
        self.webhooks: Webhooks | None = None
        self._owners: dict[str, str] = {}  # live sandbox id -> key id
        self._creating = 0  # creates in flight count against the limits too
        self._creating_by: dict[str, int] = {}
        self._writes: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._flush = asyncio.Event()  # someone waits for the store: write without lingering
        self._writing = False  # writes are taken from the queue and not yet done
        self._waiting = 0  # callers of `recorded()` waiting: write without lingering
        self.own_store = config.database_url is None and config.front_key_id is None
        self._journal = OwnerJournal(config.data_dir / "owners.journal")
        self._write_failed = False  # then the journal keeps what the store may lack
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        tune_host(self.config)
        self._store = await Store.open(self.config.database, self.engine.keys)
        self.quotas = await self._store.quotas()
        self.key_networks = await self._store.key_networks.all()
        await self.audit.start(self._store.sessions, self.engine.keys)
        self.webhooks = Webhooks.for_server(self._store.webhooks, self.config)
        await self.webhooks.start()
        self.events.listeners.append(self.webhooks.publish)
        await self.engine.start()  # re-adopts the sandboxes a previous server left running
        await self._reconcile(self._journal.open())
        self._journal.clear()
        for name, template, size in self.config.pools:
            self.engine.configure_pool(name, template, size)
        self._tasks = [
            asyncio.create_task(self._write_loop()),
            asyncio.create_task(self._prune_loop()),
            asyncio.create_task(self._revoked_loop()),
        ]

    async def close(self) -> None:
        """Stop serving but leave every sandbox running: the next start re-adopts them."""
        await self.engine.close(keep_sandboxes=True)
        await self.recorded()
        if not self._write_failed:
            self._journal.clear()
        self._journal.close()
        await self.audit.close()
        if self.webhooks is not None:
            await self.webhooks.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._store is not None:
            await self._store.close()

    @property
    def store(self) -> Store:
        assert self._store is not None, "the service is not started"
        return self._store

    def runtimes(self) -> dict[str, str | None]:
        """Every runtime, strongest first, with why this node cannot run it (None: it can)."""
        return self.engine.runtimes.report()

    async def owner_of(self, sandbox_id: str) -> str | None:
        """The key id that owns `sandbox_id` (live ones from memory, ended ones from the store)."""
        owner = self._owners.get(sandbox_id)
        if owner is not None:
            return owner
        await self.recorded()  # one created and ended a moment ago may be on its way there
        return await self.store.owner(sandbox_id)

    # -- limits and new sandboxes ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitting(self, key_id: str, count: int, spec: SandboxSpec) -> AsyncIterator[None]:
        """`admit` for the length of the block."""
        release = self.admit(key_id, count, spec)
        try:
            yield
        finally:
            release()

    def admit(
        self, key_id: str, count: int, spec: SandboxSpec, *, reserve: bool = True
    ) -> Callable[[], None]:
        """Count `count` sandboxes like `spec` that `key_id` starts against the limits and the
        node's room, or refuse them at once (429 with a time to retry, rather than queueing
        until the client times out); call what it returns once they run or have failed. An
        image build counts as one of its key's sandboxes while it runs; it does not `reserve`
        node room, since its step sandboxes count as they run."""
        if len(self._owners) + self._creating + count > self.config.max_sandboxes:
            raise LimitReached(
                f"this node runs the most sandboxes it is configured for "
                f"({self.config.max_sandboxes}); retry shortly",
                code="node_full",
                retry_after=5,
            )
        mine = sum(1 for owner in self._owners.values() if owner == key_id)
        mine += self._creating_by.get(key_id, 0)
        if mine + count > self.config.max_sandboxes_per_key:
            raise LimitReached(
                f"this API key has {mine} live sandboxes and may have "
                f"{self.config.max_sandboxes_per_key}; terminate some and retry",
                code="too_many_sandboxes",
                retry_after=5,
            )
        if reserve:  # a build's sandbox is sized by Corral, not the tenant: not their quota
            n = count
            adding = Quota(cpu=spec.cpu * n, memory_mb=spec.memory_mb * n, disk_mb=spec.disk_mb * n)
            if key_id in self.quotas:  # the sum goes over every live sandbox of the node
                self.refuse_past_quota(key_id, self.live_usage(key_id), adding)
            release_room = self.admission.reserve(spec, count)
        else:
            self.admission.check(spec, count)
            release_room = _nothing
        self._creating += count
        self._creating_by[key_id] = self._creating_by.get(key_id, 0) + count
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                release_room()
                self._creating -= count
                self._creating_by[key_id] -= count

        return release

    def with_key_network(self, key_id: str, spec: SandboxSpec) -> SandboxSpec:
        """`spec` with its key's default egress rules if it is internet and gives none."""
        rules = self.key_networks.get(key_id)
        if spec.network != "internet" or spec.egress is not None or rules is None:
            return spec
        return dataclasses.replace(spec, egress=rules)

    # -- quotas ----------------------------------------------------------------------------------

    def live_usage(self, key_id: str) -> Quota:
        """What the key's live sandboxes ask for now (hibernated ones: disk only)."""
        used = Quota()
        for sandbox_id, owner in list(self._owners.items()):
            if owner != key_id:
                continue
            with contextlib.suppress(SandboxNotFound):  # gone meanwhile
                info = self.engine.get(sandbox_id)
                spec, awake = info.spec, info.state is not SandboxState.HIBERNATED
                cpu, memory = (spec.cpu, spec.memory_mb) if awake else (0.0, 0)
                used = used.plus(Quota(cpu=cpu, memory_mb=memory, disk_mb=spec.disk_mb))
        return used

    async def usage(self, key_id: str) -> Quota:
        """Everything the key takes that a quota limits."""
        snapshots = sum(s.size_bytes for s in self.engine.list_snapshots() if s.owner == key_id)
        await self.recorded()  # its live sandboxes are counted from the store
        return await self.store.usage(key_id, snapshot_bytes=snapshots)

    def refuse_past_quota(self, key_id: str, used: Quota, adding: Quota) -> None:
        """429 `quota_exceeded` if `adding` to `used` goes past the key's quota."""
        quota = self.quotas.get(key_id)
        past = quota.exceeded_by(used.plus(adding)) if quota is not None else None
        if past is not None:
            raise LimitReached(
                f"this API key's quota does not allow it ({past}): end or delete something of "
                "yours, or ask an admin for a larger quota",
                code="quota_exceeded",
                retry_after=60,
            )

    async def check_quota(self, key_id: str, adding: Quota) -> None:
        """`refuse_past_quota` against everything the key takes (volumes, snapshots, uploads)."""
        if key_id in self.quotas:
            self.refuse_past_quota(key_id, await self.usage(key_id), adding)

    def own(self, key_id: str, info: SandboxInfo) -> None:
        """Record `key_id` as the owner of the sandbox the engine has just made."""
        # No await between the engine's create and this: the sandbox cannot change unrecorded.
        self._owners[info.id] = key_id
        self._journal.add(key_id, info.id)  # durable now; the store has it soon
        now = self.engine.get(info.id)
        self._writes.put_nowait(("add", (key_id, now)))  # later changes follow as updates
        self.events.publish(key_id, now)  # its earlier changes had no owner

    def owners(self) -> dict[str, str]:
        """Every live sandbox's owner: sandbox id -> key id (for admins)."""
        return dict(self._owners)

    async def end_sandboxes_of(self, key_id: str) -> int:
        """End every live sandbox of a revoked key (a documented choice: a revoked key's
        work stops with it); how many."""
        mine = [sandbox for sandbox, owner in self._owners.items() if owner == key_id]
        for sandbox_id in mine:
            with contextlib.suppress(CorralError):
                await self.engine.terminate(
                    sandbox_id, reason=EndReason.KEY_REVOKED, detail="its API key was revoked"
                )
        return len(mine)

    def moved_away(self, sandbox_id: str) -> None:
        """The sandbox went to another node, which records it from now on."""
        self._owners.pop(sandbox_id, None)

    async def moved_in(self, owner: str, info: SandboxInfo) -> None:
        """The sandbox came here from another node: this node's in the store once this
        returns, and its owner hears of it."""
        self._owners[info.id] = owner
        self._writes.put_nowait(("update", info))
        await self.recorded()
        self.events.publish(owner, info)

    async def recorded(self) -> None:
        """Wait until every change so far is in the store."""
        if self._writes.qsize() or self._writing:
            self._waiting += 1
            self._flush.set()
            try:
                await self._writes.join()
            finally:
                self._waiting -= 1

    # -- keeping the store in agreement with the engine -------------------------------------------

    async def _reconcile(self, journal: dict[str, str]) -> None:
        known = {info.id for info in self.engine.list_sandboxes()}
        for info in await self.store.live_sandboxes():
            # A cluster's node answers for its own sandboxes only: the others run elsewhere.
            # A server on its own answers for all (its name may have changed).
            theirs = self.config.front_key_id is not None and info.node != self.engine.node
            if info.id in known or theirs:
                continue
            now = time.time()
            lost = dataclasses.replace(
                info,
                state=SandboxState.TERMINATED,
                expires_at=None,
                ended_at=now,
                end_reason=EndReason.RUNTIME_ERROR,
                end_detail="the sandbox was gone when the server restarted",
                history=(*info.history, StateChange(SandboxState.TERMINATED, now, "runtime_error")),
            )
            await self.store.update_sandbox(lost)
        for info in self.engine.list_sandboxes():
            if await self._moved_on(info):
                continue
            owner = await self.store.owner(info.id)
            if owner is None and info.id in journal:  # answered, then the server was killed
                owner = journal[info.id]
                await self.store.add_sandbox(owner, info)
            if owner is None:
                log.warning("ending %s: no key owns it (created just before a crash)", info.id)
                await self.engine.terminate(info.id)
                continue
            await self.store.update_sandbox(self.engine.get(info.id))
            if info.state is not SandboxState.TERMINATED:
                self._owners[info.id] = owner

    async def _moved_on(self, info: SandboxInfo) -> bool:
        """Whether `info` is a stale copy on a cluster's node, dealt with here: a sandbox that
        moved to another node (this node stopped before it could forget it) is forgotten; one
        the front ended while this node was lost (`node_lost`) is ended, as the store says."""
        if self.config.front_key_id is None or info.state is SandboxState.TERMINATED:
            return False
        found = await self.store.get_sandbox(info.id)
        if found is None:
            return False
        stored = found[1]
        if stored.state is SandboxState.TERMINATED:
            log.warning("ending %s: the cluster ended it while this node was away", info.id)
            reason, detail = stored.end_reason or EndReason.NODE_LOST, stored.end_detail or ""
            await self.engine.terminate(info.id, reason=reason, detail=detail)
            return True
        if info.state is not SandboxState.HIBERNATED or stored.node in (None, self.engine.node):
            return False
        log.warning("forgetting %s: it moved to node %s", info.id, stored.node)
        await self.engine.moving.forget_moved(info.id, stored.node)
        return True

    def _changed(self, info: SandboxInfo) -> None:
        if info.state is SandboxState.RUNNING and len(info.history) > 1:
            self._woken(info)
        owner = self._owners.get(info.id)
        if info.state is SandboxState.TERMINATED:
            self._owners.pop(info.id, None)
        self._writes.put_nowait(("update", info))
        if owner is not None:
            self.events.publish(owner, info)

    def _woken(self, info: SandboxInfo) -> None:
        """A wake's seconds into the histogram, whether asked for or on use (a request)."""
        if info.history[-2].state is SandboxState.HIBERNATED:
            with contextlib.suppress(SandboxNotFound):
                seconds = self.engine.registry.get(info.id).timings.pop("wake", None)
                if seconds is not None:
                    WAKE_SECONDS.labels(info.runtime).observe(seconds)

    def _egress_denied(self, sandbox_id: str, event: dict[str, Any]) -> None:
        EGRESS_DENIED.labels(event["protocol"]).inc()
        owner = self._owners.get(sandbox_id)
        if owner is not None:
            self.events.send(owner, event)

    async def _write_loop(self) -> None:
        """Apply catalogue writes one at a time, in the order the changes happened."""
        while True:
            batch = [await self._writes.get()]
            self._writing = True
            # The requests that follow a change come first (a create's first command would
            # otherwise wait for the event loop's part of a transaction, about 1 ms).
            if self.own_store and not self._waiting:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush.wait(), WRITE_LINGER)
            self._flush.clear()
            while not self._writes.empty():
                batch.append(self._writes.get_nowait())
            for kind, item in batch:
                try:
                    if kind == "add":
                        await self.store.add_sandbox(*item)
                    else:
                        await self.store.update_sandbox(item)
                except Exception:
                    self._write_failed = True
                    log.exception("could not record a sandbox change")
                finally:
                    self._writes.task_done()
            self._writing = False
            if self._writes.empty() and not self._write_failed:  # the store has them all
                self._journal.clear()

    async def _revoked_loop(self) -> None:
        """End the sandboxes of keys revoked elsewhere (`corral keys revoke` on this machine):
        revocations through the API end them at once. Take up the quotas, key networks and
        webhooks set through other servers sharing the store too."""
        while True:
            await asyncio.sleep(REVOKED_EVERY)
            try:
                for key_id in await self.store.revoked(set(self._owners.values())):
                    await self.end_sandboxes_of(key_id)
                self.quotas = await self.store.quotas()  # set with `corral keys quota` too
                self.key_networks = await self.store.key_networks.all()
                if self.webhooks is not None:  # registered through another server
                    await self.webhooks.sync()
                await self._settle_moves()
            except Exception:
                log.exception("could not end the sandboxes of revoked keys")

    async def _settle_moves(self) -> None:
        """Settle the moves that the front neither finished nor undid (it stopped mid-move)
        by the store: the sandbox is gone if its row names another node (the take-in
        happened), else it stays here, hibernated."""
        for sandbox_id in self.engine.moving.overdue():
            found = await self.store.get_sandbox(sandbox_id)
            now_on = found[1].node if found else None
            log.warning("settling the unfinished move of %s (node %s)", sandbox_id, now_on)
            if now_on not in (None, self.engine.node):
                await self.engine.moving.gone(sandbox_id)
                self.moved_away(sandbox_id)
            else:
                await self.engine.moving.stay(sandbox_id)

    async def _prune_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.store.forget_ended(time.time() - ENDED_RETENTION)
            with contextlib.suppress(Exception):
                await self.audit.prune()
            await asyncio.sleep(PRUNE_EVERY)


def _nothing() -> None:
    pass


def tune_host(config: ServerConfig) -> None:
    """What a starting server changes of its host: its own open files limit and, unless told
    not to (`--no-favordynmods`), the kernel's cgroup mode (`favor_dynamic_changes`);
    a kernel that refuses it only makes sandboxes start slower."""
    raise_open_files_limit()
    if not config.favordynmods:
        return
    try:
        done = favor_dynamic_changes()
    except (OSError, CorralError) as exc:
        log.warning("cannot turn on the kernel's favordynmods cgroup mode: %s", exc)
        return
    if done == "turned on":
        log.info("turned on the kernel's favordynmods cgroup mode (docs/performance.md)")


def raise_open_files_limit() -> None:
    """As many open files as the system lets this process have: every sandbox holds a few
    (its agent's socket, its runtime's pipes, volumes), every client connection one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
