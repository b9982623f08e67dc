"""Running commands in real sandboxes, under every runtime."""

from __future__ import annotations

import asyncio
import time

import pytest

from corral.agent.protocol import GUEST_AGENT_DIR
from corral.core.errors import InvalidPath, InvalidRequest, InvalidState, SandboxNotFound
from corral.core.models import SandboxInfo
from corral.engine import Engine
from corral.engine.process import Process


async def test_run_returns_exit_code_and_separate_streams(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    result = await engine.run(sandbox.id, "echo out; echo err >&2; exit 3")
    assert result.exit_code == 3
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


async def test_python_prints_42(engine: Engine, sandbox: SandboxInfo) -> None:
    result = await engine.run(sandbox.id, ["python3", "-c", "print(6*7)"])
    assert (result.exit_code, result.stdout) == (0, b"42\n")


async def test_env_cwd_and_user(engine: Engine, sandbox: SandboxInfo) -> None:
    result = await engine.run(
        sandbox.id, 'echo "$GREETING"; pwd; id -u', env={"GREETING": "hi there"}, cwd="/tmp"
    )
    assert result.stdout == b"hi there\n/tmp\n0\n"
    as_nobody = await engine.run(sandbox.id, "id -un; echo $HOME; id -G", user="nobody")
    assert as_nobody.stdout.split() == [b"nobody", b"/nonexistent", b"65534"]


async def test_commands_start_through_the_leader_program(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    """The engine builds the agent's `leader` (agent/leader.c), so that commands start without
    a fork of the agent; without a C compiler they would start slower, and this fails."""
    leader = engine.data_dir / "agent" / "leader"
    assert leader.is_file(), "the engine built no leader program: is gcc installed?"
    inside = await engine.run(sandbox.id, ["test", "-x", f"{GUEST_AGENT_DIR}/leader"])
    assert inside.exit_code == 0


async def test_stdin_is_streamed_to_the_process(engine: Engine, sandbox: SandboxInfo) -> None:
    proc = await engine.exec(
        sandbox.id, ["python3", "-c", "import sys; print(sys.stdin.read().upper())"], stdin=True
    )
    await proc.write_stdin(b"hello ")
    await proc.write_stdin("world")
    await proc.close_stdin()
    result = await proc.wait()
    assert result.stdout == b"HELLO WORLD\n"


async def test_output_streams_while_the_process_runs(engine: Engine, sandbox: SandboxInfo) -> None:
    proc = await engine.exec(sandbox.id, cmd="echo first; sleep 2; echo second")
    start = time.monotonic()
    seen = []
    async for name, data in proc.output():
        seen.append((name, data, time.monotonic() - start))
    result = await proc.wait()
    assert result.exit_code == 0
    assert seen[0][:2] == ("stdout", b"first\n")
    assert seen[0][2] < 1.5  # arrived long before the process ended
    assert b"".join(d for _n, d, _t in seen) == b"first\nsecond\n"


async def test_pty_gives_a_terminal_that_resizes(engine: Engine, sandbox: SandboxInfo) -> None:
    proc = await engine.exec(sandbox.id, ["bash", "--norc", "-i"], pty=(24, 80), stdin=True)
    text = await _read_until(proc, "# ")
    await proc.write_stdin(b"tty; stty size\n")
    # Resized once bash prompts again: readline reads the size and writes it back as it prepares
    # each prompt (rltty.c, `set_winsize`), so a resize between the two is undone. Under gVisor
    # that lost about one resize in 50 sent as soon as `stty` printed, with the CPUs busy.
    text += await _read_until(proc, "24 80", "# ")
    assert "/dev/pts/" in text
    await proc.resize(40, 120)
    await proc.write_stdin(b"stty size; exit 7\n")
    result = await proc.wait()
    assert result.exit_code == 7
    after = result.stdout.decode(errors="replace")
    assert "40 120" in after, f"before the resize: {text!r}; after: {after!r}"


async def _read_until(proc: Process, *markers: str) -> str:
    """A terminal's output up to and including each of `markers`, one after the other."""
    text, at = "", 0
    async for name, data in proc.output():
        assert name == "stdout"  # a terminal has one stream
        text += data.decode(errors="replace")
        while markers and (found := text.find(markers[0], at)) >= 0:
            at, markers = found + len(markers[0]), markers[1:]
        if not markers:
            return text
    raise AssertionError(f"the process ended before printing {markers[0]!r}: {text!r}")


# Every way a command can put a process out of its own process group, each a `sleep 10NN`.
RUNAWAY = (
    "sleep 1001 & "  # a background job
    "setsid sleep 1002 & "  # a session of its own
    "(set -m; sleep 1003 &); "  # another process group (job control)
    "setsid -f sleep 1004; "  # detached: its parent is gone at once
    "python3 -c 'import os\nif os.fork() == 0:\n os.setsid()\n if os.fork() == 0:\n  "
    'os.execlp("sleep", "sleep", "1005")\'; '  # a daemon's double fork
    "sleep 1; echo started; sleep 600"
)
COUNT_SLEEPS = "ps -eo args | grep -c '^sleep 10' || true"


async def test_timeout_ends_everything_the_command_started(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    start = time.monotonic()
    result = await engine.run(sandbox.id, RUNAWAY, timeout=4)
    assert result.timed_out
    assert result.signal == 9
    assert result.stdout == b"started\n", result.stderr
    assert time.monotonic() - start < 30
    assert (await engine.run(sandbox.id, COUNT_SLEEPS)).stdout.strip() == b"0"


async def test_a_command_is_not_held_open_by_what_it_leaves_writing(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    """A background process writing on to the command's output every 50 ms does not keep the
    command open (its timeout does nothing once the command itself has exited): after the exit
    its output is read for about a second. The command's own output is all there. (Held open,
    this fails at `wait_for`; tests/unit/test_agent_pump.py has the pump's rules.)"""
    own = "head -c 300000 /dev/zero | tr '\\0' x; echo; echo done"
    ticker = "(while :; do echo tick >&2; sleep 0.05; done) & "
    result = await asyncio.wait_for(engine.run(sandbox.id, ticker + own, timeout=30), 20)
    assert (result.exit_code, result.timed_out) == (0, False), result.stderr[-200:]
    assert result.stdout == b"x" * 300_000 + b"\ndone\n"
    assert result.stderr.startswith(b"tick\n")
    # Its next write after that went into a closed pipe, which ended it (SIGPIPE).
    for _ in range(100):
        ticking = await engine.run(sandbox.id, "ps -eo args | grep -c '^sleep 0.05' || true")
        if ticking.stdout.strip() == b"0":
            break
        await asyncio.sleep(0.1)
    assert ticking.stdout.strip() == b"0"


async def test_sigkill_ends_everything_but_what_outlived_its_command(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    # Started on purpose and left behind by a command that ended normally: it keeps running.
    kept = await engine.run(sandbox.id, "nohup sleep 1010 >/dev/null 2>&1 & echo ok")
    assert kept.stdout == b"ok\n"
    proc = await engine.exec(sandbox.id, cmd=RUNAWAY)
    for _ in range(100):  # until all five runaways and the kept one are there
        if (await engine.run(sandbox.id, COUNT_SLEEPS)).stdout.strip() == b"6":
            break
        await asyncio.sleep(0.2)
    await proc.kill()
    assert (await proc.wait()).signal == 9
    left = await engine.run(sandbox.id, "ps -eo args | grep '^sleep 10'")
    assert left.stdout == b"sleep 1010\n"
    assert await engine.kill_all(sandbox.id) == 1
    assert (await engine.run(sandbox.id, COUNT_SLEEPS)).stdout.strip() == b"0"


async def test_signal_and_process_list(engine: Engine, sandbox: SandboxInfo) -> None:
    proc = await engine.exec(sandbox.id, ["sleep", "60"], tag="sleeper")
    listed = await engine.processes(sandbox.id)
    assert any(p.id == proc.id and p.running and p.tag == "sleeper" for p in listed)
    await proc.signal("SIGTERM")
    result = await proc.wait()
    assert result.signal == 15
    assert result.exit_code == 128 + 15
    listed = await engine.processes(sandbox.id)
    assert not next(p for p in listed if p.id == proc.id).running


async def test_many_concurrent_processes(engine: Engine, sandbox: SandboxInfo) -> None:
    results = await asyncio.gather(
        *(engine.run(sandbox.id, f"sleep 0.2; echo {i}") for i in range(25))
    )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(25)]


async def test_large_output_is_delivered_whole(engine: Engine, sandbox: SandboxInfo) -> None:
    result = await engine.run(sandbox.id, "head -c 20000000 /dev/zero | tr '\\0' x")
    assert len(result.stdout) == 20_000_000
    assert set(result.stdout) == {ord("x")}


async def test_bad_exec_requests_are_clear_errors(engine: Engine, sandbox: SandboxInfo) -> None:
    with pytest.raises(InvalidRequest) as missing:
        await engine.run(sandbox.id, ["no-such-command-xyz"])
    assert missing.value.code == "command_not_found"
    with pytest.raises(InvalidRequest) as cwd:
        await engine.run(sandbox.id, "true", cwd="/no/such/dir")
    assert cwd.value.code == "invalid_cwd"
    with pytest.raises(InvalidPath):
        await engine.run(sandbox.id, "true", cwd="relative/dir")
    with pytest.raises(InvalidPath):
        await engine.run(sandbox.id, "true", cwd="/tmp/\0x")
    with pytest.raises(InvalidRequest):
        await engine.run(sandbox.id, ["echo", "nul\0byte"])
    with pytest.raises(InvalidRequest) as user:
        await engine.run(sandbox.id, "true", user="no-such-user")
    assert user.value.code == "invalid_user"
    with pytest.raises(InvalidRequest):
        await engine.run(sandbox.id, "true", env={"BAD=NAME": "x"})
    with pytest.raises(InvalidRequest):
        await engine.run(sandbox.id, "true", timeout=-1)
    # The sandbox is still perfectly usable.
    assert (await engine.run(sandbox.id, "echo fine")).stdout == b"fine\n"


async def test_exec_in_unknown_or_ended_sandbox(engine: Engine, sandbox: SandboxInfo) -> None:
    with pytest.raises(SandboxNotFound):
        await engine.run("sb-0000000000000000", "true")
    with pytest.raises(InvalidRequest):
        await engine.run("not-an-id", "true")
    await engine.terminate(sandbox.id)
    with pytest.raises(InvalidState) as ended:
        await engine.run(sandbox.id, "true")
    assert "terminated" in ended.value.message


async def test_host_image_uses_the_hosts_usr(engine: Engine, runtime: str) -> None:
    from corral.core.spec import SandboxSpec

    info = await engine.create(SandboxSpec(runtime=runtime, image="host"))
    try:
        result = await engine.run(
            info.id, "python3 -c 'import sys; print(sys.version_info[0])'; id -un"
        )
        assert result.stdout == b"3\nroot\n", result
        denied = await engine.run(info.id, "touch /usr/corral-test 2>&1; echo rc=$?")
        assert b"rc=0" not in denied.stdout  # the host's /usr is read-only
    finally:
        await engine.terminate(info.id)


async def test_calls_during_a_snapshot_wait_for_it(engine: Engine) -> None:
    """A snapshot hangs up the agent's link for its moment; a command, a process list or a
    kill_all sent meanwhile waits for it, rather than failing with agent_unavailable."""
    from corral.core.spec import SandboxSpec
    from tests.conftest import require_runtime

    require_runtime("gvisor")
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        taken, ran, listed = await asyncio.gather(
            engine.snapshot(info.id),
            engine.run(info.id, "echo after"),
            engine.processes(info.id),
        )
        assert ran.stdout == b"after\n" and isinstance(listed, list)
        again, killed = await asyncio.gather(engine.snapshot(info.id), engine.kill_all(info.id))
        assert killed >= 0
        for snapshot in (taken, again):
            await engine.delete_snapshot(snapshot.id)
    finally:
        await engine.terminate(info.id)


async def test_a_command_under_way_ends_before_a_snapshot(engine: Engine) -> None:
    """A command whose caller waits for its result is let finish (for a few seconds) before
    a checkpoint hangs up the agent's link, rather than being cut off (agent_unavailable)."""
    from corral.core.spec import SandboxSpec
    from tests.conftest import require_runtime

    require_runtime("gvisor")
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        running = asyncio.create_task(engine.run(info.id, "sleep 1; echo done"))
        await asyncio.sleep(0.3)
        taken = await engine.snapshot(info.id)
        result = await running
        assert (result.exit_code, result.stdout) == (0, b"done\n")
        await engine.delete_snapshot(taken.id)
    finally:
        await engine.terminate(info.id)


async def test_a_sandbox_stays_snapshottable_after_many_commands(engine: Engine) -> None:
    """Starting a command leaves nothing behind in gVisor's Sentry: with a leader linked
    against a static C library (which reads /proc/self/exe), each command cost the Sentry
    ~90 KiB for good, and after 600 of them a second snapshot killed the sandbox at its
    memory limit (see agent/leader.c). Four at a time: a signal that ended the agent's wait for
    its vfork child early (the leader library, before the agent blocked them around the clone) hung the
    agent at the second command."""
    from corral.core.spec import SandboxSpec
    from tests.conftest import require_runtime

    require_runtime("gvisor")
    info = await engine.create(SandboxSpec(runtime="gvisor"))

    async def commands(count: int) -> None:
        for _ in range(count):
            assert (await engine.run(info.id, ["/bin/true"])).exit_code == 0

    try:
        await asyncio.gather(*(commands(200) for _ in range(4)))
        for _ in range(3):
            await engine.delete_snapshot((await engine.snapshot(info.id)).id)
        assert (await engine.run(info.id, "echo alive")).stdout == b"alive\n"
    finally:
        await engine.terminate(info.id)


async def test_a_snapshot_taken_before_the_agents_library_changed_restores_after(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gVisor sandbox restored from a snapshot maps its agent's leader library again by its
    name: an upgrade builds a new one beside it (engine.datadir.build_leader) instead of
    replacing it, so both the restored sandbox and a new one run commands."""
    from corral.core.spec import SandboxSpec
    from corral.engine import datadir
    from tests.conftest import require_runtime

    require_runtime("gvisor")
    agent_dir = engine.data_dir / "agent"
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    restored = fresh = None
    try:
        snapshot = await engine.snapshot(info.id)
        before = (agent_dir / datadir.LIBRARY_POINTER).read_text()
        monkeypatch.setattr(datadir, "LIBRARY_FLAGS", (*datadir.LIBRARY_FLAGS, "-DUPGRADED"))
        assert datadir.build_leader(agent_dir)
        assert (agent_dir / datadir.LIBRARY_POINTER).read_text() != before
        restored = await engine.create(snapshot=snapshot.id)
        fresh = await engine.create(SandboxSpec(runtime="gvisor"))
        for sandbox in (restored, fresh):
            assert (await engine.run(sandbox.id, ["echo", "alive"])).stdout == b"alive\n"
        await engine.delete_snapshot(snapshot.id)
    finally:
        for made in (info, restored, fresh):
            if made is not None:
                await engine.terminate(made.id)
        monkeypatch.undo()
        datadir.build_leader(agent_dir)  # the pointer back to this version's library


async def test_a_checkpoint_runsc_fails_is_a_clear_error_and_the_sandbox_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runsc failing a checkpoint (seen once: a crash in its state encoder, under the API
    fuzzer) answers `checkpoint_failed`, a 409 that says nothing was saved, not a 500; the
    sandbox goes on, and the next snapshot works. runsc really fails here: its image path is
    one it cannot write."""
    from corral.core.errors import CheckpointFailed
    from corral.core.spec import SandboxSpec
    from corral.core.state import SandboxState
    from tests.conftest import require_runtime

    require_runtime("gvisor")
    runtime = engine.runtimes.get("gvisor")
    runsc = runtime._runsc  # type: ignore[attr-defined]

    def unwritable(plan: object, *args: str, **options: bool) -> object:
        if args[:1] == ("checkpoint",):
            args = tuple(
                "--image-path=/proc/no-such-place" if a.startswith("--image-path=") else a
                for a in args
            )
        return runsc(plan, *args, **options)

    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        with monkeypatch.context() as patched:
            patched.setattr(runtime, "_runsc", unwritable)
            with pytest.raises(CheckpointFailed) as failed:
                await engine.snapshot(info.id)
        assert failed.value.status_code == 409 and failed.value.code == "checkpoint_failed"
        assert "nothing was" in failed.value.message and "runsc checkpoint" in failed.value.message
        assert engine.list_snapshots() == []
        assert engine.get(info.id).state is SandboxState.RUNNING
        assert (await engine.run(info.id, "echo alive")).stdout == b"alive\n"
        await engine.delete_snapshot((await engine.snapshot(info.id)).id)
    finally:
        await engine.terminate(info.id)
