"""The file API on real sandboxes, under every runtime."""

from __future__ import annotations

import hashlib
import resource
from collections.abc import AsyncIterator

import pytest

from corral.core.errors import FileExists, FileNotFound, InvalidPath, InvalidRequest
from corral.core.models import SandboxInfo
from corral.engine import Engine


async def test_write_read_roundtrip(engine: Engine, sandbox: SandboxInfo) -> None:
    files = engine.files(sandbox.id)
    assert await files.write("/root/notes/hello.txt", "héllo\n") == 7
    assert await files.read_bytes("/root/notes/hello.txt") == "héllo\n".encode()
    result = await engine.run(sandbox.id, "cat /root/notes/hello.txt")
    assert result.stdout == "héllo\n".encode()
    assert await files.write("/root/notes/hello.txt", b"more\n", append=True) == 5
    assert await files.read_bytes("/root/notes/hello.txt") == "héllo\nmore\n".encode()


async def test_write_sets_mode_and_keeps_existing_mode(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    files = engine.files(sandbox.id)
    await files.write("/root/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert (await engine.run(sandbox.id, "/root/run.sh")).stdout == b"ran\n"
    await files.write("/root/run.sh", "#!/bin/sh\necho again\n")
    assert (await files.stat("/root/run.sh")).mode == 0o755


async def test_large_file_streams_without_buffering(engine: Engine, sandbox: SandboxInfo) -> None:
    size = 1024 * 1024 * 1024
    chunk = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256()

    async def content() -> AsyncIterator[bytes]:
        for _ in range(size // len(chunk)):
            expected.update(chunk)
            yield chunk

    files = engine.files(sandbox.id)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert await files.write("/root/big.bin", content()) == size
    got = hashlib.sha256()
    total = 0
    async for part in files.read("/root/big.bin"):
        got.update(part)
        total += len(part)
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert total == size
    assert got.hexdigest() == expected.hexdigest()
    assert rss_growth_mib < 200, f"the engine grew by {rss_growth_mib:.0f} MiB"
    inside = await engine.run(sandbox.id, "sha256sum /root/big.bin", timeout=300)
    assert inside.stdout.split()[0].decode() == expected.hexdigest()


async def test_list_stat_mkdir_rename_chmod_remove(engine: Engine, sandbox: SandboxInfo) -> None:
    files = engine.files(sandbox.id)
    await files.mkdir("/root/a/b/c")
    await files.write("/root/a/one.txt", "1")
    await files.write("/root/a/b/two.txt", "22")
    await engine.run(sandbox.id, "ln -s /root/a/one.txt /root/a/link")
    top = await files.list("/root/a")
    assert sorted((e.name, e.type) for e in top) == [
        ("b", "dir"),
        ("link", "symlink"),
        ("one.txt", "file"),
    ]
    assert next(e for e in top if e.name == "link").target == "/root/a/one.txt"
    deep = await files.list("/root/a", depth=3)
    assert {e.path for e in deep} >= {"/root/a/b/c", "/root/a/b/two.txt"}
    info = await files.stat("/root/a/b/two.txt")
    assert (info.type, info.size) == ("file", 2)
    assert await files.exists("/root/a/one.txt")
    assert not await files.exists("/root/a/nope")
    await files.rename("/root/a/one.txt", "/root/a/uno.txt")
    with pytest.raises(FileExists):
        await files.rename("/root/a/uno.txt", "/root/a/b/two.txt")
    await files.rename("/root/a/uno.txt", "/root/a/b/two.txt", overwrite=True)
    assert await files.read_bytes("/root/a/b/two.txt") == b"1"
    assert (await files.chmod("/root/a/b/two.txt", 0o600)).mode == 0o600
    with pytest.raises(FileExists):  # not empty
        await files.remove("/root/a")
    await files.remove("/root/a", recursive=True)
    assert not await files.exists("/root/a")


async def test_file_errors_are_clear(engine: Engine, sandbox: SandboxInfo) -> None:
    files = engine.files(sandbox.id)
    with pytest.raises(FileNotFound):
        await files.read_bytes("/root/missing.txt")
    with pytest.raises(InvalidPath):
        await files.read_bytes("/root")
    with pytest.raises(InvalidPath):
        await files.read_bytes("relative.txt")
    with pytest.raises(InvalidPath):
        await files.write("/tmp/a\0b", b"x")
    with pytest.raises(InvalidPath):
        await files.list("/etc/hostname")
    with pytest.raises(InvalidRequest):
        await files.list("/", depth=0)
    with pytest.raises(InvalidPath):
        await files.remove("/", recursive=True)
    with pytest.raises(FileNotFound):
        await files.remove("/root/missing", recursive=True)
    for mode in (36469918188906112, -1, 0o10000, True):  # the first found by the fuzzer
        with pytest.raises(InvalidRequest, match="0o7777"):
            await files.mkdir("/root/moded", mode=mode)
        with pytest.raises(InvalidRequest, match="0o7777"):
            await files.chmod("/root", mode)
    # Nothing was harmed.
    assert (await engine.run(sandbox.id, "ls /usr/bin/python3")).exit_code == 0
