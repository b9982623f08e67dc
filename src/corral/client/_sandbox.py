"""Sandboxes as the SDK sees them: `AsyncSandbox`, its files and its commands."""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from corral.client._client import AsyncClient, default_client
from corral.client._images import build_image
from corral.client._process import AsyncProcess, OutputCallback
from corral.client._volumes import VolumeRef, mounts_body
from corral.errors import CommandTimeout, FileNotFound
from corral.image import Image
from corral.models import BuiltImage, FileInfo, ProcessInfo, SandboxInfo, StateChange
from corral.snapshots import SnapshotInfo
from corral.spec import SandboxSpec
from corral.state import EndReason, SandboxState

CHUNK = 1024 * 1024
Data = bytes | str | IO[bytes] | AsyncIterable[bytes]


@dataclass(frozen=True)
class CommandResult:
    """How a command run with `run` ended, and its output (decoded as UTF-8)."""

    exit_code: int | None
    stdout: str
    stderr: str
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = False  # the server kept only the first 8 MiB of each stream

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def parse_snapshot(data: dict[str, Any]) -> SnapshotInfo:
    """A `SnapshotInfo` from the server's JSON."""
    return SnapshotInfo(**data)


def parse_info(data: dict[str, Any]) -> SandboxInfo:
    """A `SandboxInfo` from the server's JSON."""
    return SandboxInfo(
        id=data["id"],
        state=SandboxState(data["state"]),
        runtime=data["runtime"],
        spec=SandboxSpec.from_dict(data["spec"]),
        created_at=data["created_at"],
        expires_at=data.get("expires_at"),
        timeout_remaining=data.get("timeout_remaining"),
        ended_at=data.get("ended_at"),
        end_reason=EndReason(data["end_reason"]) if data.get("end_reason") else None,
        end_detail=data.get("end_detail"),
        history=tuple(
            StateChange(SandboxState(h["state"]), h["at"], h.get("reason"))
            for h in data.get("history", ())
        ),
    )


class AsyncSandbox:
    """A sandbox on a Corral server. Create one with `await AsyncSandbox.create()`.

    Used as an async context manager, it terminates the sandbox on exit.

    Example:
        >>> async with await AsyncSandbox.create() as sandbox:
        ...     result = await sandbox.run("python3 -c 'print(6*7)'")
        ...     result.stdout
        '42\\n'
    """

    def __init__(self, client: AsyncClient, info: SandboxInfo) -> None:
        self.client = client
        self._info = info
        self.files = AsyncFiles(self)

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def state(self) -> SandboxState:
        """The state when last fetched; `await info()` refreshes it."""
        return self._info.state

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} {self.state.value}>"

    @classmethod
    async def create(
        cls,
        image: str | Image | BuiltImage | None = None,
        runtime: str | None = None,
        *,
        cpu: float = 1.0,
        memory_mb: int = 512,
        disk_mb: int = 2048,
        timeout: float = 300,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        workdir: str | None = None,
        network: str = "none",
        volumes: Mapping[str, VolumeRef] | None = None,
        pool: bool = True,
        auto_resume: bool = True,
        idle_timeout: float | None = None,
        on_idle: str = "pause",
        keep_alive: bool = False,
        on_timeout: str = "terminate",
        snapshot: str | SnapshotInfo | None = None,
        client: AsyncClient | None = None,
    ) -> AsyncSandbox:
        """Create a sandbox and return once it can run commands.

        `image` is a built-in image ("debian", the default, or "host"), the id or name of an
        image you built, or an `Image` recipe, built first (at once if cached).
        `timeout` is the lifetime, counted only while running; `idle_timeout` seconds without
        use (a command, a file operation, an attached stream) trigger `on_idle` ("pause",
        "hibernate", "terminate") unless `keep_alive`; `on_timeout` may "hibernate" instead of
        ending it. See docs/lifecycle.md. `snapshot` (a `SnapshotInfo`, or an id or name)
        starts the sandbox where that snapshot's sandbox was, with its image, runtime and
        resources (gvisor).
        `volumes` maps mount points to volumes (`AsyncVolume`, or a volume's name or id):
        `{"/data": volume, "/ref": other.read_only()}`.
        A warm pool on the server whose template matches hands over a started sandbox, which
        is much faster; `pool=False` insists on a fresh start. Sandboxes with volumes always
        start fresh.
        """
        client = client or default_client()
        if isinstance(image, Image):
            image = await build_image(image, client=client)
        if isinstance(image, BuiltImage):
            image = image.id
        body: dict[str, Any] = {
            "pool": pool,
            "runtime": runtime,
            "cpu": cpu,
            "memory_mb": memory_mb,
            "disk_mb": disk_mb,
            "timeout": timeout,
            "network": network,
            "env": dict(env or {}),
            "metadata": dict(metadata or {}),
            "auto_resume": auto_resume,
            "idle_timeout": idle_timeout,
            "on_idle": on_idle,
            "keep_alive": keep_alive,
            "on_timeout": on_timeout,
        }
        if image is not None:
            body["image"] = image
        if workdir is not None:
            body["workdir"] = workdir
        if snapshot is not None:  # the snapshot decides what is fixed at start
            for name in ("runtime", "cpu", "memory_mb", "disk_mb", "network", "image"):
                body.pop(name, None)
            body["snapshot"] = snapshot.id if isinstance(snapshot, SnapshotInfo) else snapshot
        if volumes:
            body["volumes"] = mounts_body(volumes)
        return cls(client, parse_info(await client.request("POST", "/v1/sandboxes", json=body)))

    @classmethod
    async def connect(cls, sandbox_id: str, *, client: AsyncClient | None = None) -> AsyncSandbox:
        """An existing sandbox by id (`SandboxNotFound` if your key has none such).

        A paused or hibernated sandbox is resumed first, unless it was created with
        `auto_resume=False`.
        """
        client = client or default_client()
        sandbox = cls(
            client, parse_info(await client.request("GET", f"/v1/sandboxes/{sandbox_id}"))
        )
        if sandbox._info.spec.auto_resume:
            if sandbox._info.state is SandboxState.PAUSED:
                await sandbox.resume()
            elif sandbox._info.state is SandboxState.HIBERNATED:
                await sandbox.wake()
        return sandbox

    @classmethod
    async def list(
        cls,
        metadata: Mapping[str, str] | None = None,
        state: SandboxState | str | None = None,
        *,
        client: AsyncClient | None = None,
    ) -> list[SandboxInfo]:
        """Your sandboxes (ended ones for 7 days), optionally filtered."""
        client = client or default_client()
        params: list[tuple[str, str]] = [
            ("metadata", f"{k}={v}") for k, v in (metadata or {}).items()
        ]
        if state is not None:
            params.append(("state", str(state)))
        return [
            parse_info(item) for item in await client.request("GET", "/v1/sandboxes", params=params)
        ]

    async def info(self) -> SandboxInfo:
        """The sandbox's current state, spec and (once ended) end reason."""
        self._info = parse_info(await self.client.request("GET", self._path()))
        return self._info

    async def set_timeout(self, seconds: float) -> SandboxInfo:
        """End the sandbox `seconds` from now (extends or shortens its life; at most 24 h)."""
        data = await self.client.request("POST", self._path("/timeout"), json={"timeout": seconds})
        self._info = parse_info(data)
        return self._info

    async def terminate(self) -> SandboxInfo:
        """End the sandbox now; its processes are killed and its files deleted."""
        self._info = parse_info(await self.client.request("DELETE", self._path()))
        return self._info

    async def pause(self) -> SandboxInfo:
        """Freeze every process: memory stays, CPU use and the lifetime stop (~1 ms)."""
        self._info = parse_info(await self.client.request("POST", self._path("/pause")))
        return self._info

    async def resume(self) -> SandboxInfo:
        """Thaw a paused sandbox (any use does it too, with `auto_resume`)."""
        self._info = parse_info(await self.client.request("POST", self._path("/resume")))
        return self._info

    async def snapshot_filesystem(self, name: str | None = None) -> BuiltImage:
        """A new image: this sandbox's image plus every file it changed, from one consistent
        moment (the sandbox goes on). Start any runtime's sandboxes from it."""
        data = await self.client.request(
            "POST", self._path("/filesystem-snapshot"), json={"name": name}
        )
        return BuiltImage.from_dict(data)

    async def snapshot(self, name: str | None = None, ttl: float | None = None) -> SnapshotInfo:
        """Save memory and files (gvisor; about 0.1 s plus the memory's size to disk); the
        sandbox goes on. `create(snapshot=...)` starts copies of this moment; `ttl` seconds
        later the snapshot is deleted."""
        data = await self.client.request(
            "POST", self._path("/snapshot"), json={"name": name, "ttl": ttl}
        )
        return parse_snapshot(data)

    async def fork(self, count: int) -> builtins.list[AsyncSandbox]:
        """`count` new sandboxes with this one's memory and files, diverging from now on
        (gvisor): branching for search and RL. All or none."""
        data = await self.client.request("POST", self._path("/fork"), json={"count": count})
        return [AsyncSandbox(self.client, parse_info(item)) for item in data]

    async def hibernate(self) -> SandboxInfo:
        """Write memory and files to disk and stop (gvisor): no memory or CPU used until
        `wake` or any use; survives a server restart. Open streams to it end."""
        self._info = parse_info(await self.client.request("POST", self._path("/hibernate")))
        return self._info

    async def wake(self) -> SandboxInfo:
        """Restore a hibernated sandbox exactly: processes, memory, open files, listeners."""
        self._info = parse_info(await self.client.request("POST", self._path("/wake")))
        return self._info

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = 60,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run a command to completion: a string through the shell, a list as an argv.

        Raises `CommandTimeout` (with `.result`) if it ran past `timeout` seconds.
        """
        body: dict[str, Any] = {
            "env": dict(env or {}),
            "cwd": cwd,
            "user": user,
            "timeout": timeout,
            "stdin": stdin,
        }
        body["cmd" if isinstance(cmd, str) else "argv"] = cmd if isinstance(cmd, str) else list(cmd)
        data = await self.client.request("POST", self._path("/exec"), json=body)
        result = CommandResult(
            exit_code=data["exit_code"],
            stdout=data["stdout"],
            stderr=data["stderr"],
            signal=data.get("signal"),
            timed_out=data.get("timed_out", False),
            oom_killed=data.get("oom_killed", False),
            truncated=data.get("truncated", False),
        )
        if result.timed_out:
            error = CommandTimeout(f"the command ran past its {timeout:g} s timeout and was killed")
            error.result = result
            raise error
        return result

    async def exec(
        self,
        *argv: str,
        cmd: str | None = None,
        stdin: bool = False,
        pty: bool | tuple[int, int] = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncProcess:
        """Start a process and stream it: `exec("ls", "-l")`, or `exec(cmd="ls | wc -l")`.

        `pty=True` (or `(rows, cols)`) gives it a terminal. With `on_stdout`/`on_stderr`
        each chunk goes to the callback instead of the `stdout`/`stderr` streams.
        """
        request: dict[str, Any] = {
            "env": dict(env or {}),
            "cwd": cwd,
            "user": user,
            "timeout": timeout,
            "stdin": stdin,
        }
        if argv:
            request["argv"] = list(argv)
        if cmd is not None:
            request["cmd"] = cmd
        if pty:
            rows, cols = pty if isinstance(pty, tuple) else (24, 80)
            request["pty"] = {"rows": rows, "cols": cols}
        ws = await self.client.websocket(self._path("/exec/stream"))
        return await AsyncProcess.start(ws, request, on_stdout, on_stderr)

    async def processes(self) -> builtins.list[ProcessInfo]:
        """Processes started in the sandbox, running and recently ended."""
        data = await self.client.request("GET", self._path("/processes"))
        return [ProcessInfo.from_guest(item) for item in data]

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sandboxes/{self.id}{suffix}"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.terminate()


class AsyncFiles:
    """The files of a sandbox. Paths are absolute paths inside the sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @property
    def _client(self) -> AsyncClient:
        return self._sandbox.client

    def _path(self, suffix: str = "") -> str:
        return self._sandbox._path("/files" + suffix)

    async def write(
        self, path: str, data: Data, *, mode: int | None = None, append: bool = False
    ) -> int:
        """Write bytes, text, a binary file object or an async iterable, streamed; bytes written."""
        params: dict[str, Any] = {"path": path, "append": append}
        if mode is not None:
            params["mode"] = mode
        content: bytes | AsyncIterable[bytes]
        if isinstance(data, str):
            content = data.encode()
        elif isinstance(data, bytes | bytearray | memoryview):
            content = bytes(data)
        elif isinstance(data, AsyncIterable):
            content = data
        else:
            content = _chunks_of(data)
        result = await self._client.request(
            "PUT", self._path("/content"), params=params, content=content
        )
        return int(result["bytes"])

    async def read_stream(self, path: str) -> AsyncIterator[bytes]:
        """The file's content in chunks, as it arrives."""
        async with self._client.download(self._path("/content"), {"path": path}) as response:
            async for chunk in response.aiter_bytes():
                yield chunk

    async def read(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read_stream(path)])

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def upload(self, local: str | os.PathLike[str], remote: str) -> int:
        """Copy a local file into the sandbox, streamed."""
        handle = await asyncio.to_thread(open, local, "rb")
        try:
            return await self.write(remote, handle)
        finally:
            handle.close()

    async def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        """Copy a file out of the sandbox, streamed; the local file appears only when complete."""
        target = Path(local)
        partial = target.with_name(f".{target.name}.part")
        written = 0
        handle = await asyncio.to_thread(open, partial, "wb")
        try:
            async for chunk in self.read_stream(remote):
                await asyncio.to_thread(handle.write, chunk)
                written += len(chunk)
        except BaseException:
            handle.close()
            partial.unlink(missing_ok=True)
            raise
        handle.close()
        os.replace(partial, target)
        return written

    async def list(self, path: str, depth: int = 1) -> list[FileInfo]:
        data = await self._client.request(
            "GET", self._path(), params={"path": path, "depth": depth}
        )
        return [FileInfo(**item) for item in data]

    async def stat(self, path: str) -> FileInfo:
        """What is at `path` (`FileNotFound` if nothing is)."""
        return FileInfo(
            **await self._client.request("GET", self._path("/stat"), params={"path": path})
        )

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFound:
            return False
        return True

    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> FileInfo:
        body = {"path": path, "parents": parents, "mode": mode}
        return FileInfo(**await self._client.request("POST", self._path("/mkdir"), json=body))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._client.request(
            "DELETE", self._path(), params={"path": path, "recursive": recursive}
        )

    async def rename(self, src: str, dst: str, *, overwrite: bool = False) -> FileInfo:
        body = {"src": src, "dst": dst, "overwrite": overwrite}
        return FileInfo(**await self._client.request("POST", self._path("/rename"), json=body))

    async def chmod(self, path: str, mode: int) -> FileInfo:
        body = {"path": path, "mode": mode}
        return FileInfo(**await self._client.request("POST", self._path("/chmod"), json=body))


async def _chunks_of(handle: IO[bytes]) -> AsyncIterator[bytes]:
    while True:
        chunk = await asyncio.to_thread(handle.read, CHUNK)
        if not chunk:
            return
        yield chunk
