"""Replaying a sandbox's recorded actions in a fork of a snapshot (`corral audit replay`).

The snapshot starts a new sandbox (the fork); the sandbox's commands and code recorded since
the snapshot was taken (all of them, for a snapshot of another sandbox) run there again, in
the order they ran, with the file changes between them that the log can repeat (remove,
rename, mkdir, chmod). Each step's outcome (exit code, or the code's error, and the digests of
its outputs) is compared with the recorded one. What the log never keeps cannot be replayed,
and such steps say so instead of guessing: a file's contents, a command's stdin or terminal
input, environment values (commands run without them, and the step says which). Code that ran
in a context of its own runs in a new context of the same language, one per recorded context.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio

from corral.core.audit import FILE_CHANGES, REPLAYED, AuditEntry, ReplayStep
from corral.core.errors import CorralError, InvalidRequest
from corral.core.models import SnapshotInfo
from corral.core.spec import DEFAULT_SPEC, MAX_TIMEOUT, SandboxSpec
from corral.server.audit.log import MAX_PAGE, AuditLog
from corral.server.audit.trail import EXCERPT, CodeWatch, ExecWatch
from corral.server.resources.sandboxes import Command, Sandboxes

MAX_STEPS = 10_000
LONGEST = 600.0  # seconds a replayed step may run, whatever it took when recorded
_EXEC_FIELDS = ("exit_code", "signal", "timed_out", "stdout_sha256", "stderr_sha256")
_CODE_FIELDS = ("error", "stdout_sha256", "stderr_sha256", "results_sha256")


async def recorded_steps(
    log: AuditLog, key_id: str, sandbox_id: str, snapshot: SnapshotInfo
) -> tuple[list[AuditEntry], bool]:
    """The sandbox's replayable entries of key `key_id` in the order they started (at most
    `MAX_STEPS`), and whether there were more."""
    since = snapshot.created_at if snapshot.sandbox_id == sandbox_id else None
    steps: list[AuditEntry] = []
    cursor = None
    while len(steps) <= MAX_STEPS:
        page = await log.query(
            key_id=key_id, sandbox_id=sandbox_id, operations=(*REPLAYED, *FILE_CHANGES),
            since=since, cursor=cursor, limit=MAX_PAGE,
        )  # fmt: skip
        steps += page
        if len(page) < MAX_PAGE:
            break
        cursor = page[-1].id
    if not steps:
        raise InvalidRequest(
            f"the audit log has no commands, code or file changes of {sandbox_id} "
            + ("since the snapshot was taken" if since is not None else "")
            + " to replay (is it your sandbox, and were they recorded within the retention?)",
            code="nothing_to_replay",
        )
    steps.sort(key=lambda e: (e.at, e.id))  # recorded when they ended; replayed as they began
    return steps[:MAX_STEPS], len(steps) > MAX_STEPS


class Replay:
    """Replays a sandbox's entries in a fork of `snapshot` made with `sandboxes` (the
    caller's): `start` makes the fork (its errors come before any answer), `run` replays."""

    def __init__(self, sandboxes: Sandboxes, snapshot: SnapshotInfo, keep: bool) -> None:
        self._sandboxes = sandboxes
        self._snapshot = snapshot
        self._keep = keep
        self._contexts: dict[str, str] = {}  # recorded context -> the fork's
        self.fork_id = ""

    async def start(self, sandbox_id: str, entries: list[AuditEntry]) -> None:
        # Its lifetime covers the longest the replay can take: a fork nobody ends still ends.
        longest = sum(_limit(entry) + 10 for entry in entries) + 300
        spec = SandboxSpec(timeout=min(longest, MAX_TIMEOUT),
                           metadata={"corral.replay_of": sandbox_id})  # fmt: skip
        fork = await self._sandboxes.create(spec, pool=False, snapshot=self._snapshot.id)
        self.fork_id = fork.id

    async def run(
        self, sandbox_id: str, entries: list[AuditEntry], cut: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """`{"type": "started", fork_id}`, then one `{"type": "step", ...}` per entry (see
        `ReplayStep`), then `{"type": "end", ...}` (`cut`: more were recorded than replayed)."""
        yield {"type": "started", "fork_id": self.fork_id, "steps": len(entries)}
        different = 0
        try:
            for entry in entries:
                step = await self._step(self.fork_id, entry)
                different += step.result in ("different", "failed")
                yield {"type": "step", **step.to_dict()}
        finally:
            with anyio.CancelScope(shield=True):  # even when its client went away
                await self._finish()
        yield {"type": "end", "sandbox_id": sandbox_id, "snapshot": self._snapshot.id,
               "fork_id": self.fork_id, "steps": len(entries), "different": different,
               "cut": cut}  # fmt: skip

    async def _finish(self) -> None:
        """End the fork, or, kept, give it an ordinary lifetime from now."""
        with contextlib.suppress(CorralError):
            if self._keep:
                await self._sandboxes.set_timeout(self.fork_id, DEFAULT_SPEC.timeout)
            else:
                await self._sandboxes.terminate(self.fork_id)

    async def _step(self, fork_id: str, entry: AuditEntry) -> ReplayStep:
        detail = {k: v for k, v in entry.detail.items() if k != "outcome"}
        recorded = dict(entry.detail.get("outcome") or {})
        base: dict[str, Any] = {"entry_id": entry.id, "operation": entry.operation,
                                "detail": detail, "recorded": recorded}  # fmt: skip
        why = _unreplayable(entry)
        if why is not None:
            return ReplayStep(**base, result="skipped", reason=why)
        fields: tuple[str, ...]
        try:
            if entry.operation == "exec":
                replayed, fields = await self._exec(fork_id, entry), _EXEC_FIELDS
            elif entry.operation == "code":
                replayed, fields = await self._code(fork_id, entry), _CODE_FIELDS
            else:
                await self._file_change(fork_id, entry)
                return ReplayStep(**base, result="same")
        except (CorralError, TimeoutError) as exc:
            why = str(exc) or f"it ran past {LONGEST:.0f} s"
            return ReplayStep(**base, result="failed", reason=why)
        differences = [f for f in fields if recorded.get(f) != replayed.get(f)]
        missing = detail.get("env")
        reason: str | None = None
        if missing:
            reason = f"ran without the values of {', '.join(missing)} (never recorded)"
        return ReplayStep(**base, result="different" if differences else "same",
                          differences=differences, replayed=replayed, reason=reason)  # fmt: skip

    async def _exec(self, fork_id: str, entry: AuditEntry) -> dict[str, Any]:
        d = entry.detail
        limit = _limit(entry)
        command = Command(cmd=d.get("cmd"), argv=d.get("argv"), cwd=d.get("cwd"),
                          user=d.get("user"), timeout=limit)  # fmt: skip
        process = await self._sandboxes.start(fork_id, command)
        watch = ExecWatch(keep=EXCERPT)
        process.observe(watch)
        try:
            async with asyncio.timeout(limit + 10):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(CorralError):
                await process.kill()
            raise
        return {**(watch.outcome or {}), "output": watch.digest.excerpts()}

    async def _code(self, fork_id: str, entry: AuditEntry) -> dict[str, Any]:
        d = entry.detail
        language = str(d.get("language") or "python")
        context = d.get("context")
        if context is not None:
            if context not in self._contexts:
                files = await self._sandboxes.interpreter(fork_id)
                made = await files[1].create_context(fork_id, language=language)
                self._contexts[context] = made.id
            context = self._contexts[context]
        limit = _limit(entry)
        events = await self._sandboxes.run_code(
            fork_id, d["code"], language=language, context=context, env=None, timeout=limit
        )
        watch = CodeWatch(keep=EXCERPT)
        async with asyncio.timeout(limit + 10):
            async for event in events:
                watch.event(event)
        return {**watch.outcome(), "output": watch.digest.excerpts()}

    async def _file_change(self, fork_id: str, entry: AuditEntry) -> None:
        files = await self._sandboxes.files(fork_id)
        d = entry.detail
        if entry.operation == "files.remove":
            await files.remove(d["path"], recursive=bool(d.get("recursive")))
        elif entry.operation == "files.rename":
            await files.rename(d["path"], d["to"], overwrite=bool(d.get("overwrite")))
        elif entry.operation == "files.mkdir":
            await files.mkdir(d["path"], parents=d.get("parents", True), mode=d.get("mode", 0o755))
        elif entry.operation == "files.chmod":
            await files.chmod(d["path"], int(d["mode"]))


def _limit(entry: AuditEntry) -> float:
    """Seconds a replayed step may run: its own timeout, at most `LONGEST`."""
    return min(float(entry.detail.get("timeout") or LONGEST), LONGEST)


def _unreplayable(entry: AuditEntry) -> str | None:
    """Why `entry` cannot be replayed, or None."""
    d = entry.detail
    if entry.operation == "files.write":
        return "file contents are never recorded: later steps may differ for it"
    if entry.status is not None and entry.status >= 400:
        return f"it failed when recorded ({entry.error or entry.status})"
    if d.get("cut"):
        return "it was longer than the audit log keeps"
    if d.get("pty") or (d.get("outcome") or {}).get("stdin_bytes"):
        return "its input (stdin or a terminal) is never recorded"
    if entry.operation in REPLAYED and (entry.error or not d.get("outcome")):
        why = f"error {entry.error}" if entry.error else "still running when its request ended"
        return f"it did not run to its end when recorded ({why})"
    return None
