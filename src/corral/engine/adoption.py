"""Sandboxes outlive the engine process: a closing engine lets go of them (`release`), and the
next engine on the same data directory takes them over from their records (`adopt_all`).

Whatever died while no engine ran is cleaned up and recorded as ended with the reason; what
outlived its lifetime ends; idle pooled sandboxes are released (pools refill themselves).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from corral.core.errors import Conflict, CorralError
from corral.core.state import EndReason, SandboxState
from corral.engine.checkpoints import CHECKPOINT_DIR
from corral.engine.lifecycle import Lifecycle
from corral.engine.record import RECORD_NAME, Phase, SandboxRecord, read_saved, settle_saved
from corral.engine.registry import Registry
from corral.engine.runtime_set import RuntimeSet
from corral.engine.volumes import VolumeStore
from corral.host.procs import process_start_time
from corral.host.scope import HostScope
from corral.runtimes import Launch

log = logging.getLogger("corral.engine")

# Runtime processes this Python process started and an engine left running on
# `close(keep_sandboxes=True)`. Held here so that Python neither warns about them nor reaps them
# behind an adopting engine's back; an engine in this same process takes them back on adoption
# and so still learns their exit status.
_HANDED_OVER: dict[int, subprocess.Popen[bytes]] = {}


def _scope_name(index: object) -> str:
    return "none (the whole host)" if index is None else str(index)


def _scope_option(index: object) -> str:
    return "no --host-scope" if index is None else f"--host-scope {index}"


class Adoption:
    """Hands sandboxes from one engine to the next through the data directory."""

    def __init__(
        self,
        data_dir: Path,
        registry: Registry,
        runtimes: RuntimeSet,
        *,
        lifecycle: Lifecycle,
        volumes: VolumeStore,
    ) -> None:
        self._data_dir = data_dir
        self._registry = registry
        self._runtimes = runtimes
        self._lifecycle = lifecycle
        self._volumes = volumes

    async def release(self, record: SandboxRecord) -> None:
        """Let go of a running sandbox, leaving it to a later engine."""
        async with record.lock:  # a pause or resume in flight finishes first
            await self._lifecycle.stop_watching(record)
            if record.link.waker is not None:  # it dozes: thawed for any later engine
                await record.link.waker()
            await record.link.close()
            record.save()
            launch = record.launch
            if launch is not None and launch.child is not None:
                _HANDED_OVER[launch.pid] = launch.child
            # Forgotten here, so that starting this engine again adopts it afresh.
            self._registry.discard(record.id)

    async def adopt_all(self) -> None:
        """Adopt every sandbox recorded in the data directory."""
        # A checkpoint or restore the previous engine was in the middle of is over.
        await asyncio.to_thread(self._lifecycle.sealed.clear_leftovers)
        adopted_internet: list[SandboxRecord] = []
        self._lifecycle.adopting = True  # volumes are released by one sweep, below
        for path, saved in await asyncio.to_thread(self._read_records):
            try:
                record = await self._adopt(saved)
            except Exception as exc:  # one bad record must not keep the engine from starting
                log.error(
                    "could not adopt the sandbox recorded in %s: %s", path, exc, exc_info=True
                )
                continue
            if record is not None and record.alive and record.spec.network == "internet":
                adopted_internet.append(record)
        self._lifecycle.adopting = False
        if adopted_internet:
            # The firewall lives in the kernel and survives the engine; writing it again is
            # idempotent and tells this engine it is there.
            try:
                # One transaction with every adopted sandbox's rules: none is ever without.
                await self._lifecycle.ensure_firewall(adopted_internet)
            except (CorralError, OSError) as exc:
                log.error("could not reinstall the sandbox firewall: %s", exc)
        # Only now that every live sandbox is known: volumes nobody uses any more (their last
        # sandbox ended while no engine ran) are unmounted, the others stay as they are.
        try:
            await self._volumes.sweep()
        except CorralError as exc:
            log.error("could not unmount unused volumes: %s", exc)

    def check_scope(self, scope: HostScope) -> None:
        """Refuse to start in `scope` on sandboxes made in another: their cgroups, interfaces
        and firewall rules are in that scope's names, which this engine would not use."""
        for path, saved in self._read_records():
            plan = saved.get("plan")
            made_in = plan.get("scope") if isinstance(plan, dict) else None
            if made_in != scope.index and saved.get("state") != SandboxState.TERMINATED.value:
                raise Conflict(
                    f"the sandbox recorded in {path.parent} was made in host scope "
                    f"{_scope_name(made_in)} and this engine runs in {_scope_name(scope.index)}; "
                    f"start it with {_scope_option(made_in)}, or use another --data-dir",
                    code="host_scope_mismatch",
                )

    def _read_records(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every readable sandbox record in the data directory; unreadable ones are logged."""
        records = []
        for directory in sorted((self._data_dir / "sandboxes").glob("sb-*")):
            path = directory / RECORD_NAME
            try:
                saved = read_saved(directory)
                settle_saved(directory)
            except FileNotFoundError:
                log.warning("sandbox directory %s has no record; left as it is", directory)
                continue
            except (OSError, ValueError) as exc:
                log.error("skipping unreadable sandbox record %s: %s", path, exc)
                continue
            records.append((path, saved))
        return records

    async def _adopt(self, saved: dict[str, Any]) -> SandboxRecord | None:
        """Take over the sandbox `saved` describes, or record how it ended; None if known."""
        record = SandboxRecord.from_saved(saved, self._lifecycle.sealed.keys)
        if self._registry.find(record.id) is not None:
            return None
        expected = (self._data_dir / "sandboxes" / record.id).resolve()
        if record.plan.dir.resolve() != expected:
            raise ValueError(f"record of {record.id} names another directory: {record.plan.dir}")
        self._registry.add(record)
        if record.state is SandboxState.HIBERNATED:  # nothing runs: its checkpoint is on disk
            record.exited.set()
            if not (record.plan.dir / CHECKPOINT_DIR).is_dir():
                await self._lifecycle.end(
                    record, EndReason.RUNTIME_ERROR, "its checkpoint is missing"
                )
            return record
        pid, start_time = saved.get("pid"), saved.get("pid_start_time")
        handed_over = _HANDED_OVER.pop(pid, None) if isinstance(pid, int) else None
        alive = (
            record.phase in (Phase.RUNNING, Phase.PAUSED, Phase.POOLED)
            and isinstance(pid, int)
            and isinstance(start_time, int)
            # The same process, not a later one that reuses its number.
            and await asyncio.to_thread(process_start_time, pid) == start_time
        )
        if not alive:
            if handed_over is not None:
                handed_over.poll()  # reap it
            await self._bury(record)
            return record
        assert isinstance(pid, int) and isinstance(start_time, int)
        record.launch = Launch(pid, child=handed_over, start_time=start_time)
        await self._take_over(record)
        return record

    async def _take_over(self, record: SandboxRecord) -> None:
        """Watch an adopted, running sandbox again and apply what happened meanwhile."""
        try:
            await record.link.listen()  # the agent re-dials by itself
        except OSError as exc:
            self._lifecycle.watch(record)
            detail = f"could not listen again: {exc}"
            await self._lifecycle.end(record, EndReason.RUNTIME_ERROR, detail)
            return
        self._lifecycle.watch(record)
        log.info("adopted sandbox %s (%s, %s)", record.id, record.runtime, record.state)
        runtime = self._runtimes.get(record.runtime)
        if record.phase is Phase.RUNNING and runtime.freeze_idle and not record.pooled:
            try:  # it may have been left dozing (`corral.engine.doze`): its agent must re-dial
                await asyncio.to_thread(runtime.wake, record.plan)
            except (CorralError, OSError) as exc:
                log.warning("could not thaw adopted sandbox %s: %s", record.id, exc)
        if record.pooled:  # an idle pooled sandbox: nobody's yet, and pools refill themselves
            await self._lifecycle.end(
                record, EndReason.ENGINE_SHUTDOWN, "idle pooled sandbox released"
            )
        elif record.expires_at is not None and record.expires_at <= time.time():
            await self._lifecycle.end(record, EndReason.TIMEOUT, "lifetime timeout reached")

    async def _bury(self, record: SandboxRecord) -> None:
        """Clean up after a sandbox that died while no engine ran, and record why."""
        record.exited.set()
        if record.state is SandboxState.TERMINATED:
            detail = record.end_detail  # ended, but its cleanup had failed: try again
        elif record.state is SandboxState.CREATING:
            detail = "the engine stopped while creating the sandbox"
        else:
            detail = "the runtime exited while the engine was stopped"
            log_tail = await asyncio.to_thread(
                self._runtimes.get(record.runtime).log_tail, record.plan
            )
            if log_tail:
                detail += f": {log_tail}"
        runtime = self._runtimes.get(record.runtime)
        try:
            await asyncio.to_thread(runtime.destroy, record.plan)
        except Exception as exc:  # recorded below; the record is retried next start
            log.error("cleaning up %s failed: %s", record.id, exc)
            detail = f"{detail or ''} (cleanup failed: {exc})".strip()
        if record.state is SandboxState.TERMINATED:
            record.end_detail = detail
            record.save()
        else:
            record.move(Phase.ENDING)
            record.end(EndReason.RUNTIME_ERROR, detail)
        log.warning("sandbox %s ended while no engine ran: %s", record.id, detail)
