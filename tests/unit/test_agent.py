"""The agent protocol end to end: the real guest agent, run on the host, and the host's link.

No sandbox is involved (and no root needed): this checks framing, multiplexing, flow control,
cancellation and reconnection; the sandbox tests check the same agent inside each runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import corral.agent.guest as guest_module
from corral.agent import memory
from corral.agent import protocol as P
from corral.agent.fileops import GuestError
from corral.agent.shell import find_program
from corral.core.errors import AgentUnavailable, FileNotFound, InvalidRequest
from corral.engine.agentlink import MAX_HANDSHAKES, AgentLink, Channel, unwrap
from corral.engine.files import SandboxFiles
from corral.engine.record import new_secret


@contextlib.asynccontextmanager
async def running_agent(socket_dir: Path) -> AsyncIterator[tuple[AgentLink, int]]:
    """A host link and the agent (its pid) connected to it."""
    link = AgentLink(socket_dir, "sb-test", new_secret())
    link.write_key(os.getuid())
    await link.listen()
    start = Path(guest_module.__file__).with_name("start.py")  # as sandboxes start it
    agent = subprocess.Popen([sys.executable, "-I", "-S", str(start), str(socket_dir)])
    try:
        await link.wait_connected(10)
        yield link, agent.pid
    finally:
        agent.kill()
        agent.wait()
        await link.close()


@pytest.fixture
async def link(tmp_path: Path) -> AsyncIterator[AgentLink]:
    async with running_agent(tmp_path) as (link, _):
        yield link


async def test_hello_and_ping(link: AgentLink) -> None:
    assert link.hello["version"] == P.VERSION
    assert (await link.call(P.PING, {}))["pong"] is True


async def test_a_started_agent_has_loaded_only_what_serving_needs(tmp_path: Path) -> None:
    """Every idle agent keeps what it imported at its start, in every sandbox: no OpenSSL (the
    link's HMAC uses Python's own sha256) and no compression modules (shutil brings them; it is
    imported where a recursive remove or a code context needs it). docs/performance.md."""
    async with running_agent(tmp_path) as (link, pid):
        assert (await link.call(P.PING, {}))["pong"] is True
        maps = Path(f"/proc/{pid}/maps").read_text()
    heavy = ("_ssl.", "_hashlib.", "libcrypto", "libssl", "_lzma.", "liblzma", "_bz2.", "libbz2")
    assert [name for name in heavy if name in maps] == []


def test_the_agent_imports_no_asyncio_and_no_typing() -> None:
    """Every agent's start imports what serving needs: its own event loop (`aio`), not asyncio
    and what asyncio brings (logging, inspect, concurrent.futures), and not `typing`, whose
    names the agent uses in annotations only. docs/performance.md, "Seventh round". Nor the
    Python modules over the C ones the agent uses directly (`lean`), nor `subprocess`:
    "Eighth round"."""
    agent_dir = Path(guest_module.__file__).parent
    code = (
        f"import sys; sys.modules['_hashlib'] = None; sys.path.insert(0, {str(agent_dir)!r}); "
        "import guest; print(' '.join(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "guest" in loaded and "aio" in loaded
    heavy = {"asyncio", "typing", "logging", "inspect", "concurrent", "ssl", "shutil"}
    heavy |= {"subprocess", "threading", "locale", "selectors", "collections", "signal"}
    heavy |= {"socket", "enum", "functools", "json", "re", "hmac", "hashlib", "heapq"}
    assert heavy & set(loaded) == set()


def test_a_command_imports_nothing_more() -> None:
    """What a command's start uses was imported at the agent's start: a module imported at the
    first command is time every sandbox's first command pays (`os.get_exec_path` imported
    `warnings`: 0.5 ms, docs/performance.md "Twelfth round") and memory its agent keeps."""
    agent_dir = Path(guest_module.__file__).parent
    code = (
        f"import os, sys; sys.path.insert(0, {str(agent_dir)!r}); import guest, procs, shell; "
        "before = set(sys.modules); "
        "env = {'PATH': os.defpath}; "
        "shell.find_program(procs.Command({'argv': ['true']}, env).runs[0], env, '/'); "
        "procs.Command({'cmd': 'echo ok | cat > /dev/null'}, env); "
        "r, w = os.pipe(); procs.queued(r); "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    added = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert added == []


@pytest.mark.parametrize("path", [None, "", "/usr/bin", "/nowhere:/usr/bin", "::/usr/bin", "rel:"])
def test_a_program_is_found_on_path_as_exec_finds_it(tmp_path: Path, path: str | None) -> None:
    """`find_program` searches PATH as `os.get_exec_path` splits it: none means the default
    path, an empty entry the command's directory."""
    (tmp_path / "rel").mkdir()
    for where in (tmp_path, tmp_path / "rel"):
        program = where / "tool"
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    env = {} if path is None else {"PATH": path}
    for name in ("true", "tool"):
        expected = next(
            (
                os.path.join(str(tmp_path), d, name)
                for d in os.get_exec_path(env)
                if os.path.isfile(os.path.join(str(tmp_path), d, name))
                and os.access(os.path.join(str(tmp_path), d, name), os.X_OK)
            ),
            None,
        )
        if expected is None:
            with pytest.raises(GuestError):
                find_program(name, env, str(tmp_path))
        else:
            assert find_program(name, env, str(tmp_path)) == expected


async def test_a_call_larger_than_what_the_agent_buffers_is_answered(link: AgentLink) -> None:
    """A CALL may carry megabytes (code to run, up to 4 MiB): the agent's reader pauses past
    128 KiB unread, and must read on for a frame larger than that."""
    padding = "x" * 300_000
    assert (await link.call(P.PING, {"padding": padding}))["pong"] is True
    assert (await link.call(P.PING, {}))["pong"] is True


async def test_an_answer_too_large_for_a_frame_is_an_error_not_silence(
    link: AgentLink, tmp_path: Path
) -> None:
    """A listing whose JSON is over the frame limit (a process in the sandbox made 4,500
    symlinks with 4 KB targets) is answered with a clear error, not left unanswered for the
    call to time out; the agent serves on."""
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    target = "t" * 4000
    for n in range(4500):
        (crowded / f"link-{n}").symlink_to(target)
    with pytest.raises(InvalidRequest) as caught:
        await asyncio.wait_for(link.call(P.FS_LIST, {"path": str(crowded)}), 30)
    assert caught.value.code == "result_too_large"
    assert "ask for less" in caught.value.message
    assert (await link.call(P.PING, {}))["pong"] is True


async def test_unknown_method_is_an_error_not_a_crash(link: AgentLink) -> None:
    with pytest.raises(Exception) as failed:
        await link.call("no.such.method", {})
    assert "unknown method" in str(failed.value)
    assert (await link.call(P.PING, {}))["pong"] is True


async def test_slow_reader_does_not_block_other_streams(link: AgentLink) -> None:
    # A process writing far more than one window while nobody reads it...
    chatty = await link.open(P.PROC_START, {"argv": ["yes"], "timeout": 30})
    kind, started = await chatty.receive()
    assert kind == P.EVENT and started["type"] == "started"
    await asyncio.sleep(0.5)
    # ...does not stop other calls on the same connection.
    for _ in range(20):
        assert (await link.call(P.PING, {}))["pong"] is True
    await link.call(P.PROC_SIGNAL, {"id": started["id"], "signal": "SIGKILL"})
    result = await chatty.result()
    assert result["signal"] == 9


async def test_a_signal_is_named_by_its_own_name_only(link: AgentLink) -> None:
    """Found by the API fuzzer: "__dict__" was looked up on the signal module (a 500)."""
    sleeper = await link.open(P.PROC_START, {"argv": ["sleep", "30"], "timeout": 30})
    _, started = await sleeper.receive()
    for wrong in ("__dict__", "getsignal", "TERM", "SIGNOPE", 999):
        with pytest.raises(InvalidRequest):
            await link.call(P.PROC_SIGNAL, {"id": started["id"], "signal": wrong})
    await link.call(P.PROC_SIGNAL, {"id": started["id"], "signal": "SIGKILL"})
    assert (await sleeper.result())["signal"] == 9


async def test_a_flood_of_signals_leaves_the_agent_serving(tmp_path: Path) -> None:
    """Anything in a sandbox may signal the agent (pid 1) as fast as it can: every signal it
    handles is a byte in its loop's wake-up pipe (`aio.Loop`). Real-time signals queue, so
    while it is stopped tens of thousands wait, more than the pipe holds; once it runs again
    it still sees its commands end (SIGCHLD) and answers."""
    async with running_agent(tmp_path) as (link, pid):
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(80_000):
                os.kill(pid, signal.SIGRTMIN + 4)
        except OSError:  # the queue is full (RLIMIT_SIGPENDING): enough
            pass
        finally:
            os.kill(pid, signal.SIGCONT)
        for _ in range(3):
            command = await link.open(P.PROC_START, {"argv": ["true"], "timeout": 30})
            result = await asyncio.wait_for(command.result(), 30)
            assert result["exit_code"] == 0, result
        assert (await link.call(P.PING, {}))["pong"] is True


async def test_stdin_arrives_whole_and_in_order_when_the_process_reads_it_late(
    link: AgentLink,
) -> None:
    """Each STDIN frame is written by the agent as the pipe takes it: frames that arrive while
    the pipe is full wait their turn, and the end of input comes after all of them."""
    data = os.urandom(900_000)  # 14 frames, within the stream's window, 14 times the pipe
    late_reader = "import hashlib, sys, time; time.sleep(0.5); " + (
        "print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"
    )
    out, _ = await _fed(link, [sys.executable, "-c", late_reader], data)
    assert out.decode().strip() == hashlib.sha256(data).hexdigest()


async def test_a_command_ending_with_its_stdin_full_leaves_the_agent_serving(
    link: AgentLink,
) -> None:
    """A command ends while a STDIN frame still waits for room in its pipe (a process it left
    behind holds the pipe and never reads): the descriptor is closed, and its number, reused
    by the next commands' pipes, must not still be watched for the old pipe."""
    holder = "sleep 5 <&0 >/dev/null 2>&1 &"
    command = await link.open(
        P.PROC_START, {"argv": ["sh", "-c", holder], "stdin": True, "timeout": 30}
    )
    assert (await command.receive())[1]["type"] == "started"  # as the engine, before stdin
    await command.send_data(P.STDIN, os.urandom(300_000))  # more than the pipe holds
    assert (await asyncio.wait_for(command.result(), 30))["exit_code"] == 0
    for number in range(10):
        out, reply = await _fed(link, ["cat"], b"line %d" % number)
        assert "error" not in reply, reply
        assert out == b"line %d" % number


async def test_a_stdin_ended_early_is_not_closed_again_when_its_command_ends(
    link: AgentLink,
) -> None:
    """The end of a command's input closes its pipe, and the next commands' pipes reuse the
    number: the first command's end must not close (or stop watching) one of theirs."""
    first = await link.open(
        P.PROC_START, {"argv": ["sh", "-c", "cat >/dev/null; sleep 0.5"], "stdin": True}
    )
    assert (await first.receive())[1]["type"] == "started"
    await first.send_eof(P.STDIN)
    await link.call(P.PING, {})  # the agent has taken the end of input by its answer
    # Pipes are made stdout, stderr, stdin, each at the lowest free numbers: the third of
    # these gets the closed pipe's number for its own end of its stdout.
    later = []
    for params in ({"argv": ["cat"], "stdin": True}, {"argv": ["sleep", "1"]}) * 2:
        started = await link.open(P.PROC_START, {**params, "timeout": 30})
        assert (await started.receive())[1]["type"] == "started"
        later.append(started)
    assert (await asyncio.wait_for(first.result(), 30))["exit_code"] == 0
    for command in later[::2]:
        data = os.urandom(200_000)  # more than a pipe holds: the agent waits for room in it
        out, reply = await _feed(command, data)
        assert reply["result"]["exit_code"] == 0 and out == data, reply
    for command in later[1::2]:
        assert (await asyncio.wait_for(command.result(), 30))["exit_code"] == 0


async def _fed(link: AgentLink, argv: list[str], data: bytes) -> tuple[bytes, dict[str, Any]]:
    """Run `argv` with `data` as its whole stdin, sent once it has started (as the engine
    does: a frame before the started event has no process to go to); its stdout and REPLY."""
    command = await link.open(P.PROC_START, {"argv": argv, "stdin": True, "timeout": 30})
    assert (await command.receive())[1]["type"] == "started"
    return await _feed(command, data)


async def _feed(command: Channel, data: bytes) -> tuple[bytes, dict[str, Any]]:
    """`data` as the whole stdin of a started `command`; its stdout and REPLY."""
    await command.send_data(P.STDIN, data)
    await command.send_eof(P.STDIN)
    out = b""
    while True:
        kind, payload = await asyncio.wait_for(command.receive(), 30)
        if kind == P.STDOUT:
            out += payload
        elif kind == P.REPLY:
            return out, payload


async def test_files_stream_and_cancel(link: AgentLink, tmp_path: Path) -> None:
    files = SandboxFiles(link)
    data = bytes(range(256)) * 40_000  # ~10 MB, ten windows
    assert await files.write(str(tmp_path / "big"), data) == len(data)
    assert await files.read_bytes(str(tmp_path / "big")) == data
    # Abandoning a read part-way cancels it and leaves the link usable.
    reader = files.read(str(tmp_path / "big"))
    first = await reader.__anext__()
    assert first
    await reader.aclose()
    assert (await link.call(P.PING, {}))["pong"] is True
    with pytest.raises(FileNotFound):
        await files.read_bytes(str(tmp_path / "missing"))
    with pytest.raises(InvalidRequest):
        await files.list(str(tmp_path), depth=100)


async def test_agent_redials_after_the_host_restarts(link: AgentLink) -> None:
    await link.close()
    with pytest.raises(AgentUnavailable):
        await link.call(P.PING, {})
    await link.listen()
    await link.wait_connected(10)
    assert (await link.call(P.PING, {}))["pong"] is True


async def test_a_peer_ignoring_flow_control_is_cut_off(tmp_path: Path) -> None:
    """Even a peer that holds the secret (an agent gone wrong) cannot make the host buffer."""
    secret = new_secret()
    link = AgentLink(tmp_path, "sb-test", secret)
    await link.listen()
    reader, writer = await asyncio.open_unix_connection(str(link.socket_path))
    length, _stream, kind = P.decode_header(await reader.readexactly(P.HEADER.size))
    challenge = await reader.readexactly(length)
    hello = {"version": P.VERSION, "pid": 1, "proof": P.proof(secret, challenge)}
    writer.write(P.encode_json(0, P.HELLO, hello))
    await link.wait_connected(5)
    channel = await link.open(P.PROC_START, {"argv": ["true"]})
    header = await reader.readexactly(P.HEADER.size)
    length, stream, kind = P.decode_header(header)
    await reader.readexactly(length)
    assert kind == P.CALL
    chunk = b"x" * P.CHUNK
    with contextlib.suppress(ConnectionError):  # the host hangs up on us part-way
        for _ in range(2 * P.WINDOW_INITIAL // P.CHUNK):  # twice the window, never waiting
            writer.write(P.encode(stream, P.STDOUT, chunk))
            await writer.drain()
    with pytest.raises(AgentUnavailable):
        await asyncio.wait_for(channel.result(), 10)
    assert not link.connected
    writer.close()
    await link.close()
    await asyncio.sleep(0.1)  # let the event loop finish closing both ends


async def test_output_is_drained_while_no_host_listens(link: AgentLink, tmp_path: Path) -> None:
    """A process writing while the host is away is neither blocked on a full pipe nor killed."""
    counter = tmp_path / "counter"
    writer = tmp_path / "writer.py"
    writer.write_text(
        "import os, sys\n"
        "for i in range(10**9):\n"
        "    sys.stdout.buffer.write(bytes(65536)); sys.stdout.flush()\n"
        f"    open({str(counter)!r} + '.tmp', 'w').write(str(i))\n"
        f"    os.replace({str(counter)!r} + '.tmp', {str(counter)!r})\n"
    )
    chatty = await link.open(P.PROC_START, {"argv": [sys.executable, str(writer)]})
    kind, started = await chatty.receive()
    assert kind == P.EVENT and started["type"] == "started"
    await asyncio.sleep(0.3)  # unread, it exhausts its window: the guest waits for credit
    await link.close()
    await asyncio.sleep(0.3)
    first = int(counter.read_text())
    for _ in range(200):  # the bound only catches a process stuck on a full pipe
        await asyncio.sleep(0.05)
        if int(counter.read_text()) > first + 100:
            break
    else:
        raise AssertionError("the process stopped writing once the host was gone")
    await link.listen()
    await link.wait_connected(10)
    (listed,) = await link.call(P.PROC_LIST, {})
    assert listed["running"]
    await link.call(P.PROC_SIGNAL, {"id": started["id"], "signal": "SIGKILL"})


# -- only the agent speaks for the sandbox --------------------------------------------------------


async def _impostor(link: AgentLink, hello: dict[str, object], *, answer: bool = True) -> bytes:
    """Connect as someone who knows the socket's name but not the secret; what is left to read
    once the host has judged the HELLO (b"" if it hung up)."""
    reader, writer = await asyncio.open_unix_connection(str(link.socket_path))
    try:
        if not answer:  # speak first, as an old agent did
            writer.write(P.encode_json(0, P.HELLO, hello))
        length, _stream, kind = P.decode_header(await reader.readexactly(P.HEADER.size))
        assert kind == P.CHALLENGE
        await reader.readexactly(length)
        if answer:
            writer.write(P.encode_json(0, P.HELLO, hello))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_key_is_read_once_and_the_socket_is_named_by_the_secret(
    link: AgentLink, tmp_path: Path
) -> None:
    assert not (tmp_path / P.KEY_NAME).exists()  # gone once the agent proved it held it
    assert link.secret is not None
    assert link.socket_path.name == P.socket_name(link.secret) != P.LEGACY_SOCKET_NAME
    assert [p.name for p in tmp_path.iterdir()] == [link.socket_path.name]


async def test_a_peer_without_the_secret_is_refused_and_replaces_nothing(
    link: AgentLink,
) -> None:
    hello = link.hello
    for forged in (
        {"version": P.VERSION, "pid": 1, "proof": "00" * 32},
        {"version": P.VERSION, "pid": 1},
        {"version": 1, "pid": 1},  # an old agent's HELLO, unasked for
    ):
        assert await _impostor(link, forged) == b"", forged
    assert await _impostor(link, {"version": 1, "pid": 1}, answer=False) == b""
    assert link.hello is hello  # the agent's connection is the one still in place
    assert (await link.call(P.PING, {}))["pong"] is True


async def test_connections_that_never_answer_cannot_keep_the_agent_out(link: AgentLink) -> None:
    idle = [
        await asyncio.open_unix_connection(str(link.socket_path)) for _ in range(MAX_HANDSHAKES * 3)
    ]
    try:
        await asyncio.sleep(0.2)  # all accepted: asyncio leaks one still being set up on close
        await link.quiesce()  # the agent hangs up and re-dials, into a crowd of silent peers
        await link.listen()
        await link.wait_connected(10)
        assert (await link.call(P.PING, {}))["pong"] is True
    finally:
        for _reader, writer in idle:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await asyncio.sleep(0.2)  # the host sees them go


async def test_an_agent_from_before_version_2_is_still_adopted(tmp_path: Path) -> None:
    """A sandbox started by an older Corral, adopted after an upgrade: its agent (old code, in
    memory) dials the old socket and says HELLO unasked, without a proof."""
    legacy = AgentLink(tmp_path, "sb-old", None)
    await legacy.listen()
    assert legacy.socket_path.name == P.LEGACY_SOCKET_NAME
    reader, writer = await asyncio.open_unix_connection(str(legacy.socket_path))
    try:
        writer.write(P.encode_json(0, P.HELLO, {"version": 1, "pid": 7}))
        await legacy.wait_connected(10)
        assert legacy.hello == {"version": 1, "pid": 7}
        ping = asyncio.ensure_future(legacy.call(P.PING, {}))
        length, stream, kind = P.decode_header(await reader.readexactly(P.HEADER.size))
        assert kind == P.CALL
        assert json.loads(await reader.readexactly(length))["method"] == P.PING
        writer.write(P.encode_json(stream, P.REPLY, {"result": {"pong": True}}))
        assert (await ping)["pong"] is True
    finally:
        writer.close()
        await legacy.close()


async def test_the_socket_is_bound_however_deep_its_directory(tmp_path: Path) -> None:
    """A socket's address holds 107 bytes; a data directory may be deeper than that."""
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 5)
    deep.mkdir(parents=True)
    link = AgentLink(deep, "sb-deep", new_secret())
    await link.listen()
    try:
        assert len(str(link.socket_path)) > 108
        assert stat.S_ISSOCK(link.socket_path.lstat().st_mode)
        fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
        try:
            _, writer = await asyncio.open_unix_connection(
                f"/proc/self/fd/{fd}/{link.socket_path.name}"
            )
        finally:
            os.close(fd)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.2)  # the host sees it go
    finally:
        await link.close()
    assert not link.socket_path.exists()


def test_the_memory_guard_reads_use_and_the_largest_process(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  327680 kB\nMemFree:  100000 kB\nMemAvailable:  294912 kB\n")
    assert memory.in_use(str(meminfo)) == (327680 - 294912) * 1024
    for pid, pages in ((10, 100), (11, 5000), (os.getpid(), 99999)):  # the agent aside
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "statm").write_text(f"9999 {pages} 0 0 0 0 0\n")
    (tmp_path / "12").mkdir()  # gone while it looked: no statm
    (tmp_path / "self").mkdir()
    victim, held = memory.processes(str(tmp_path))
    assert victim == (11, 5000 * memory.PAGE)
    assert held == 5100 * memory.PAGE


async def test_a_quiesce_lets_calls_under_way_finish_and_holds_new_ones(tmp_path: Path) -> None:
    """The agent hangs up as soon as it reads QUIESCE, dropping calls it has read but not yet
    answered. So the host sends QUIESCE only once its calls with one answer have theirs, and
    calls made while the agent is away wait for it to dial back, rather than failing."""
    secret = new_secret()
    link = AgentLink(tmp_path, "sb-test", secret)
    await link.listen()

    async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(str(link.socket_path))
        length, _stream, _kind = P.decode_header(await reader.readexactly(P.HEADER.size))
        challenge = await reader.readexactly(length)
        writer.write(
            P.encode_json(
                0, P.HELLO, {"version": P.VERSION, "pid": 1, "proof": P.proof(secret, challenge)}
            )
        )
        return reader, writer

    async def frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        length, stream, kind = P.decode_header(await reader.readexactly(P.HEADER.size))
        return stream, kind, await reader.readexactly(length)

    reader, writer = await dial()
    await link.wait_connected(5)
    under_way = asyncio.create_task(link.call(P.PING, {}))
    stream, kind, _ = await frame(reader)
    assert kind == P.CALL
    quiescing = asyncio.create_task(link.quiesce())
    with pytest.raises(TimeoutError):  # no QUIESCE while the call waits for its answer
        await asyncio.wait_for(frame(reader), 0.3)
    writer.write(P.encode_json(stream, P.REPLY, {"result": {"pong": True}}))
    assert (await frame(reader))[1] == P.QUIESCE
    writer.close()
    await quiescing
    assert await under_way == {"pong": True}

    late = asyncio.create_task(link.call(P.PING, {}))  # while the agent is away
    await asyncio.sleep(0.2)
    assert not late.done()
    await link.listen()
    reader, writer = await dial()
    stream, kind, _ = await frame(reader)
    assert kind == P.CALL
    writer.write(P.encode_json(stream, P.REPLY, {"result": {"pong": "again"}}))
    assert await asyncio.wait_for(late, 5) == {"pong": "again"}
    writer.close()
    await link.close()
    await asyncio.sleep(0.1)


async def test_a_port_that_never_reads_does_not_keep_its_connection_open(
    tmp_path: Path,
) -> None:
    """A server in the sandbox that accepts and never reads: once the host ends the relay
    (CANCEL), the agent closes the connection, dropping what the port did not take, rather
    than holding the socket and its buffer for as long as the server lives."""
    from corral.engine.ports import PortStream

    held: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never reads

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_agent(tmp_path) as (link, pid):
            before = len(os.listdir(f"/proc/{pid}/fd"))
            channel = await link.open(P.PORT_CONNECT, {"port": port})
            assert (await channel.receive())[0] == P.EVENT
            stream = PortStream(channel)
            with contextlib.suppress(TimeoutError):  # the credit runs out: the port reads none
                await asyncio.wait_for(stream.send(b"x" * (8 << 20)), 2)
            await asyncio.wait_for(stream.close(), 10)
            for _ in range(200):  # the agent's side is closed, CLOSE_GRACE (2 s) later
                if len(os.listdir(f"/proc/{pid}/fd")) == before:
                    break
                await asyncio.sleep(0.05)
            assert len(os.listdir(f"/proc/{pid}/fd")) == before
            assert (await link.call(P.PING, {}))["pong"] is True
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_what_the_host_sent_before_it_ended_a_relay_reaches_the_port(
    link: AgentLink,
) -> None:
    """A client that sends and hangs up at once (a WebSocket's last message, then its close):
    the port still gets every byte, then the connection's end."""
    from corral.engine.ports import PortStream

    got = bytearray()
    ended = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            got.extend(data)
        ended.set()
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        channel = await link.open(P.PORT_CONNECT, {"port": port})
        assert (await channel.receive())[0] == P.EVENT
        stream = PortStream(channel)
        data = os.urandom(600_000)  # within the stream's credit: sent at once
        await stream.send(data)
        await stream.close()
        await asyncio.wait_for(ended.wait(), 10)
        assert bytes(got) == data
    finally:
        server.close()
        await server.wait_closed()


async def test_a_port_connection_carries_bytes_both_ways(link: AgentLink) -> None:
    """port.connect: a TCP connection opened by the agent, relayed under flow control; its
    end either way, and nothing listening as `port_closed`."""
    from corral.core.errors import PortClosed
    from corral.engine.ports import PortStream

    closed = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()  # our peer shut down its side: end the connection
        closed.set()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:

        async def connect(half_close: bool) -> PortStream:
            channel = await link.open(P.PORT_CONNECT, {"port": port, "half_close": half_close})
            kind, event = await channel.receive()
            assert (kind, event) == (P.EVENT, {"type": "connected"})
            return PortStream(channel)

        stream = await connect(half_close=True)
        data = b"abc" * 2_000_000  # 6 MB: many windows each way
        sending = asyncio.create_task(stream.send(data))
        received = b""
        while len(received) < len(data):
            chunk = await stream.receive()
            assert chunk is not None
            received += chunk
        await sending
        assert received == data.upper()
        await stream.send_eof()  # half_close: the server sees the end and hangs up
        assert await stream.receive() is None
        await asyncio.wait_for(closed.wait(), 5)

        closed.clear()
        stream = await connect(half_close=False)
        await stream.send(b"ping")
        assert await stream.receive() == b"PING"
        await stream.close()  # the server's side sees the connection closed
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()
    channel = await link.open(P.PORT_CONNECT, {"port": port})
    kind, reply = await channel.receive()
    assert kind == P.REPLY
    with pytest.raises(PortClosed, match=f"port {port}"):
        unwrap(reply)
