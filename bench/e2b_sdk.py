"""E2B's SDKs against Corral, for bench/run.py: the same operations through E2B's protocol and
through Corral's own SDK, on the same server and runtime (the server's default: E2B's SDK
cannot choose one), so the difference is the protocol's."""

from __future__ import annotations

import os
from typing import Any

from e2b import AsyncSandbox as E2bSandbox
from e2b_code_interpreter import AsyncSandbox as E2bCodeSandbox

from corral import AsyncSandbox

PAYLOAD = b"x" * 1024
LOGIN_TRUE = ["/bin/bash", "-l", "-c", "true"]


async def e2b_figures(suite: Any, summary: Any) -> None:
    """Record create, a command, a file round trip and run_code, each both ways."""
    os.environ.update(
        E2B_API_URL=suite.server.url,
        E2B_SANDBOX_URL=suite.server.url,
        E2B_API_KEY=suite.server.admin_key,
    )
    n = suite.args.samples
    probe = await E2bSandbox.create()
    runtime = (
        await (await AsyncSandbox.connect(probe.sandbox_id, client=suite.client)).info()
    ).runtime
    await probe.kill()
    theirs = [await suite.timed(_e2b_create_kill) for _ in range(max(n // 5, 5))]
    ours = [await suite.timed(lambda: _create_terminate(suite)) for _ in range(max(n // 5, 5))]
    suite.record("create + end (E2B SDK)", runtime, summary(theirs))
    suite.record("create + end (Corral SDK)", runtime, summary(ours))

    e2b = await E2bSandbox.create()
    sandbox = await AsyncSandbox.create(pool=False, client=suite.client)
    try:
        pairs = {
            # E2B's SDK runs every command as `bash -l -c`: Corral's side runs the same argv.
            "command true": (lambda: e2b.commands.run("true"), lambda: sandbox.run(LOGIN_TRUE)),
            "write + read 1 KiB": (
                lambda: _e2b_file(e2b),
                lambda: _corral_file(sandbox),
            ),
        }
        for name, (through_e2b, through_corral) in pairs.items():
            theirs = [await suite.timed(through_e2b) for _ in range(n)]
            ours = [await suite.timed(through_corral) for _ in range(n)]
            suite.record(f"{name} (E2B SDK)", runtime, summary(theirs))
            suite.record(f"{name} (Corral SDK)", runtime, summary(ours))
    finally:
        await e2b.kill()
        await sandbox.terminate()
    await _run_code(suite, runtime, summary)


async def _run_code(suite: Any, runtime: str, summary: Any) -> None:
    n = suite.args.samples
    e2b = await E2bCodeSandbox.create()
    sandbox = await AsyncSandbox.create(image="code-interpreter", pool=False, client=suite.client)
    try:
        await e2b.run_code("x = 0")
        await sandbox.run_code("x = 0")
        theirs = [await suite.timed(lambda: e2b.run_code("x += 1")) for _ in range(n)]
        ours = [await suite.timed(lambda: sandbox.run_code("x += 1")) for _ in range(n)]
        suite.record("run_code x += 1 (E2B SDK)", runtime, summary(theirs))
        suite.record("run_code x += 1 (Corral SDK)", runtime, summary(ours))
    finally:
        await e2b.kill()
        await sandbox.terminate()


async def _e2b_create_kill() -> None:
    await (await E2bSandbox.create()).kill()


async def _create_terminate(suite: Any) -> None:
    await (await AsyncSandbox.create(pool=False, client=suite.client)).terminate()


async def _e2b_file(sandbox: E2bSandbox) -> None:
    await sandbox.files.write("/tmp/bench", PAYLOAD)
    await sandbox.files.read("/tmp/bench", format="bytes")


async def _corral_file(sandbox: AsyncSandbox) -> None:
    await sandbox.files.write("/tmp/bench", PAYLOAD)
    await sandbox.files.read("/tmp/bench")
