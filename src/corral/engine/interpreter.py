"""The code interpreter: stateful code contexts in a sandbox, run by its guest agent.

Each context is an interpreter process in the sandbox (see `corral.agent.contexts`) whose
variables last across executions. An execution streams its events (see `corral.core.code`)
as they happen: output, rich results and its error, then an `end` with its count. What the
agent sends is checked for shape here before anything passes it on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from corral.agent import protocol as P
from corral.core.code import ALIASES, LANGUAGES, MAX_CODE_BYTES, CodeContext, check_context_id
from corral.core.errors import (
    AgentUnavailable,
    InvalidRequest,
    SandboxFailed,
    UnsupportedLanguage,
)
from corral.core.spec import MAX_TIMEOUT, check_env, check_sandbox_path
from corral.engine.access import Access
from corral.engine.agentlink import Channel, unwrap
from corral.engine.commands import agent_call, explain_loss
from corral.engine.record import SandboxRecord
from corral.engine.runtime_set import RuntimeSet

CODE_IMAGE = "code-interpreter"  # pools of it start a python context in each sandbox
MAX_LINE = 16 * 1024 * 1024  # an event's JSON: the agent keeps results to 8 MiB
EVENT_TYPES = frozenset({"started", "stdout", "stderr", "result", "error"})


def check_language(language: str) -> str:
    """`language` (or what its alias stands for) if Corral knows it; whether the sandbox has
    it, its agent says."""
    language = ALIASES.get(language, language) if isinstance(language, str) else language
    if language not in LANGUAGES:
        raise UnsupportedLanguage(
            f"language {language!r} is not available; available: {', '.join(LANGUAGES)}, "
            "where the sandbox's image has them"
        )
    return language


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidRequest(f"timeout must be a number of seconds, got {timeout!r}")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise InvalidRequest(f"timeout must be 0 to {MAX_TIMEOUT:g} seconds, got {timeout!r}")
    return float(timeout)


def _context_params(
    record: SandboxRecord, env: Mapping[str, str] | None, cwd: str | None
) -> dict[str, Any]:
    """How a context's interpreter starts: the sandbox's env and workdir, then the context's."""
    merged = {**record.plan.env, **record.spec.env, **check_env(env or {})}
    workdir = check_sandbox_path(cwd, "cwd") if cwd is not None else None
    return {"env": merged, "cwd": workdir or record.spec.workdir or record.plan.workdir}


def _event(message: Any) -> dict[str, Any]:
    """An event from the agent, with the fields its type needs (else SandboxFailed)."""
    kind = message.get("type") if isinstance(message, dict) else None
    if kind not in EVENT_TYPES:
        raise SandboxFailed(f"the guest agent sent an unknown code event {kind!r}")
    if kind in ("stdout", "stderr"):
        return {"type": kind, "text": str(message.get("text", ""))}
    if kind == "result":
        data = message.get("data")
        if not isinstance(data, dict):
            raise SandboxFailed("the guest agent sent a result without data")
        return {"type": kind, "data": data, "is_main_result": bool(message.get("is_main_result"))}
    if kind == "error":
        fields = ("name", "value", "traceback")
        return {"type": kind, **{name: str(message.get(name, "")) for name in fields}}
    return {"type": kind, "context": str(message.get("context", ""))}


async def _events(channel: Channel) -> AsyncIterator[dict[str, Any]]:
    """The execution's events: JSON lines in FILE frames, then the REPLY as `end`."""
    pending = b""
    while True:
        kind, payload = await channel.receive()
        if kind == P.REPLY:
            summary = unwrap(payload)
            if not isinstance(summary, dict):
                raise SandboxFailed("the guest agent ended the execution without a summary")
            yield {
                "type": "end",
                "context": str(summary.get("context", "")),
                "execution_count": int(summary.get("execution_count") or 0),
                "timed_out": bool(summary.get("timed_out")),
                "context_lost": bool(summary.get("context_lost")),
                "truncated": bool(summary.get("truncated")),
            }
            return
        if kind != P.FILE:
            continue
        pending += payload
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE:
            raise SandboxFailed("the guest agent sent a code event over 16 MiB")
        for line in lines:
            try:
                yield _event(json.loads(line))
            except ValueError:
                raise SandboxFailed("the guest agent sent a code event that is not JSON") from None


async def prestart(record: SandboxRecord) -> None:
    """Start the sandbox's default python context now (for a warm pool, before a claim); it
    takes the claiming request's env and workdir at its first execution."""
    params = {"language": "python", "pooled": True, **_context_params(record, None, None)}
    await agent_call(record, P.CODE_CREATE, params)


class Interpreter:
    """Runs code in sandboxes' code contexts, and manages the contexts."""

    def __init__(self, access: Access, runtimes: RuntimeSet) -> None:
        self._access = access
        self._runtimes = runtimes

    async def run(
        self,
        sandbox_id: str,
        code: str,
        *,
        language: str = "python",
        context: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Run `code`; its events as they happen (see `corral.core.code`). Errors in the
        request (an unknown language or context) are raised before the first event."""
        if not isinstance(code, str) or "\0" in code:
            raise InvalidRequest("code must be a string without NUL bytes")
        if len(code.encode()) > MAX_CODE_BYTES:
            raise InvalidRequest(f"code is over {MAX_CODE_BYTES >> 20} MiB; write it to a file")
        if context is None:
            language = check_language(language)
        else:
            check_context_id(context)
        record = await self._access.use(sandbox_id, "run code in")
        start = _context_params(record, None, None)  # for a default context it starts
        params = {
            "code": code,
            "env": check_env(env or {}),
            "timeout": _check_timeout(timeout),
            "language": language if context is None else None,
            "context": context,
            "cwd": start["cwd"],
            "context_env": start["env"],
        }
        runtime = self._runtimes.get(record.runtime)
        ooms = runtime.oom_kills(record.plan)  # one small cgroup file read
        try:
            channel = await record.link.open(P.CODE_RUN, params)
        except AgentUnavailable as exc:
            raise await explain_loss(record, exc) from exc
        return self._stream(record, channel, lambda: runtime.oom_kills(record.plan) > ooms)

    async def _stream(
        self, record: SandboxRecord, channel: Channel, oom: Callable[[], bool]
    ) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async for event in _events(channel):
                if event["type"] == "error" and event["name"] == "ContextLost" and oom():
                    event["value"] = (  # the kernel's cgroup killed it: say so
                        "the context's interpreter ran out of memory (the sandbox's memory "
                        "limit); it was restarted and its variables are lost"
                    )
                yield event
        except AgentUnavailable as exc:
            raise await explain_loss(record, exc) from exc
        finally:
            if not channel.done:
                await channel.cancel()  # the caller went away: interrupt the code

    async def create_context(
        self,
        sandbox_id: str,
        *,
        language: str = "python",
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CodeContext:
        language = check_language(language)
        record = await self._access.use(sandbox_id, "create a code context in")
        params = {"language": language, **_context_params(record, env, cwd)}
        return CodeContext.from_dict(await agent_call(record, P.CODE_CREATE, params))

    async def contexts(self, sandbox_id: str) -> list[CodeContext]:
        record = await self._access.use(sandbox_id, "list the code contexts of")
        return [CodeContext.from_dict(found) for found in await agent_call(record, P.CODE_LIST, {})]

    async def restart_context(self, sandbox_id: str, context_id: str) -> CodeContext:
        check_context_id(context_id)
        record = await self._access.use(sandbox_id, "restart a code context in")
        found = await agent_call(record, P.CODE_RESTART, {"context": context_id})
        return CodeContext.from_dict(found)

    async def remove_context(self, sandbox_id: str, context_id: str) -> None:
        check_context_id(context_id)
        record = await self._access.use(sandbox_id, "remove a code context from")
        await agent_call(record, P.CODE_REMOVE, {"context": context_id})
