"""The Python SDK, sync and async, against a real server and real sandboxes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from pathlib import Path

import pytest

import corral
from corral import AsyncSandbox, Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import Server


@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
def test_five_lines_of_python(client: corral.Client, runtime: str) -> None:
    require_runtime(runtime)
    with Sandbox.create(runtime=runtime, client=client) as sandbox:
        result = sandbox.run("python3 -c 'print(6*7)'")
        assert (result.exit_code, result.stdout, result.stderr) == (0, "42\n", "")
        assert sandbox.info().runtime == runtime
    info = sandbox.info()
    assert info.state is corral.SandboxState.TERMINATED
    assert info.end_reason is corral.EndReason.USER


def test_environment_configures_the_default_client(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_URL", server.url)
    monkeypatch.setenv("CORRAL_API_KEY", server.admin_key)
    monkeypatch.setattr("corral.client._sync._default", None)
    try:
        with Sandbox.create(runtime="namespaces", env={"GREETING": "hi"}) as sandbox:
            assert sandbox.client.url == server.url
            assert sandbox.run("echo $GREETING", env={"EXTRA": "x"}).stdout == "hi\n"
            assert sandbox.run(["sh", "-c", "pwd"], cwd="/tmp").stdout == "/tmp\n"
    finally:
        made = corral.client._sync._default
        if made is not None:
            made.close()


def test_run_reports_failure_timeout_and_stdin(client: corral.Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        failed = sandbox.run("echo out; echo err >&2; exit 3")
        assert (failed.exit_code, failed.stdout, failed.stderr, failed.ok) == (
            3,
            "out\n",
            "err\n",
            False,
        )
        assert sandbox.run("tr a-z A-Z", stdin="shout").stdout == "SHOUT"
        flood = sandbox.run("head -c 9000000 /dev/zero | tr '\\0' a; echo done >&2")
        assert (flood.truncated, len(flood.stdout), flood.stderr) == (True, 8 << 20, "done\n")
        with pytest.raises(corral.CommandTimeout) as caught:
            sandbox.run("echo started; sleep 30", timeout=1)
        assert caught.value.result.stdout == "started\n"


def test_exec_streams_and_takes_stdin(client: corral.Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        process = sandbox.exec(
            "python3", "-c", "import sys; print(sys.stdin.read()[::-1])", stdin=True
        )
        process.stdin.write("hello")
        process.stdin.close()
        assert b"".join(process.stdout) == b"olleh\n"
        assert process.wait() == 0

        seen: list[bytes] = []
        process = sandbox.exec(
            cmd="for i in 1 2 3; do echo $i; sleep 0.1; done; echo bad >&2; exit 4",
            on_stdout=seen.append,
        )
        assert process.wait() == 4
        assert b"".join(seen) == b"1\n2\n3\n"
        assert process.stderr.read() == b"bad\n"


def test_exec_kill_and_pty(client: corral.Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        process = sandbox.exec("sleep", "600")
        assert any(p.id == process.id and p.running for p in sandbox.processes())
        process.kill()
        assert process.wait() == 128 + 9
        assert process.result().signal == 9

        terminal = sandbox.exec(
            cmd="stty size; tty; read line; stty size", pty=(30, 100), stdin=True
        )
        output = b""
        chunks = iter(terminal.stdout)
        while b"/dev/pts/" not in output:
            output += next(chunks)
        terminal.resize(40, 120)
        terminal.stdin.write("\n")
        output += b"".join(chunks)
        assert terminal.wait() == 0
        assert output.decode().split() == ["30", "100", output.decode().split()[2], "40", "120"]


def test_files_round_trip(client: corral.Client, tmp_path: Path) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        files = sandbox.files
        assert files.write("/root/a/b.txt", "hello") == 5
        assert files.read("/root/a/b.txt") == b"hello"
        assert files.read_text("/root/a/b.txt") == "hello"
        files.write("/root/stream.bin", io.BytesIO(b"x" * 3_000_000))
        assert files.stat("/root/stream.bin").size == 3_000_000
        files.mkdir("/root/d/e")
        assert {f.name for f in files.list("/root")} >= {"a", "d", "stream.bin"}
        files.rename("/root/a/b.txt", "/root/d/c.txt")
        assert not files.exists("/root/a/b.txt") and files.exists("/root/d/c.txt")
        assert files.chmod("/root/d/c.txt", 0o600).mode & 0o777 == 0o600
        with pytest.raises(corral.FileExists):
            files.remove("/root/d")
        files.remove("/root/d", recursive=True)
        with pytest.raises(corral.FileNotFound):
            files.read("/root/d/c.txt")
        with pytest.raises(corral.InvalidPath):
            files.read("relative.txt")


def test_large_upload_and_download_stream(client: corral.Client, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    chunk = os.urandom(1 << 20)
    with source.open("wb") as handle:
        for _ in range(64):
            handle.write(chunk)
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        assert sandbox.files.upload(source, "/root/big.bin") == 64 << 20
        assert sandbox.run("sha256sum /root/big.bin | cut -c1-64").stdout.strip() == (
            _sha256(source)
        )
        target = tmp_path / "back.bin"
        assert sandbox.files.download("/root/big.bin", target) == 64 << 20
        assert _sha256(target) == _sha256(source)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_list_filters_connect_and_timeout(client: corral.Client) -> None:
    first = Sandbox.create(runtime="namespaces", metadata={"job": "a"}, client=client)
    second = Sandbox.create(runtime="namespaces", metadata={"job": "b"}, client=client)
    try:
        found = Sandbox.list(metadata={"job": "a"}, client=client)
        assert [info.id for info in found] == [first.id]
        running = {info.id for info in Sandbox.list(state="running", client=client)}
        assert {first.id, second.id} <= running
        again = Sandbox.connect(second.id, client=client)
        assert again.info().metadata == {"job": "b"}
        before = again.info().expires_at
        assert before is not None
        extended = again.set_timeout(3600)
        assert extended.expires_at is not None and extended.expires_at > before
    finally:
        first.terminate()
        second.terminate()
    ended = {info.id for info in Sandbox.list(state="terminated", client=client)}
    assert {first.id, second.id} <= ended


def test_expiry_is_recorded_and_visible_afterwards(client: corral.Client) -> None:
    sandbox = Sandbox.create(runtime="namespaces", timeout=1, client=client)
    for _ in range(300):  # hang bound only
        info = sandbox.info()
        if info.state is corral.SandboxState.TERMINATED:
            break
        time.sleep(0.1)
    assert info.end_reason is corral.EndReason.TIMEOUT
    with pytest.raises(corral.InvalidState):
        sandbox.run("true")


async def test_async_sdk(aclient: corral.AsyncClient) -> None:
    async with await AsyncSandbox.create(runtime="namespaces", client=aclient) as sandbox:
        result = await sandbox.run("python3 -c 'print(6*7)'")
        assert result.stdout == "42\n"
        chunks: list[bytes] = []

        async def collect(data: bytes) -> None:
            chunks.append(data)

        process = await sandbox.exec(cmd="echo one; echo two >&2", on_stderr=collect)
        assert [c async for c in process.stdout] == [b"one\n"]
        assert await process.wait() == 0
        assert b"".join(chunks) == b"two\n"
        await sandbox.files.write("/root/x", b"data")
        assert await sandbox.files.read("/root/x") == b"data"
        # Several commands at once on one sandbox.
        results = await asyncio.gather(*(sandbox.run(f"echo {i}") for i in range(8)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]
    assert (await sandbox.info()).state is corral.SandboxState.TERMINATED
