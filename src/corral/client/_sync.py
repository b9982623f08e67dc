"""The synchronous SDK: a thin layer that runs the async SDK on a background event loop.

Each `Client` owns one event loop in a daemon thread (its "portal"); every sync call hands the
matching async call to that loop and waits for it. Nothing here does I/O of its own, so the
async code stays the single source of truth. Output callbacks (`on_stdout`, `on_stderr`) run
on the portal's thread.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import IO, Any, TypeVar

from corral.client import _images
from corral.client._client import AsyncClient
from corral.client._process import AsyncOutput, AsyncProcess, ProcessExit
from corral.client._sandbox import AsyncFiles, AsyncSandbox, CommandResult
from corral.client._volumes import AsyncVolume
from corral.image import Image
from corral.models import BuildEvent, BuiltImage, FileInfo, ProcessInfo, SandboxInfo
from corral.snapshots import SnapshotInfo
from corral.state import SandboxState

T = TypeVar("T")


class _Portal:
    """An event loop on a daemon thread that runs coroutines for synchronous callers."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="corral-sdk", daemon=True
        )
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError(
                "a sync Corral call from an output callback would wait on itself; "
                "use the async SDK (AsyncSandbox) for that"
            )
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


async def _make_client(url: str | None, api_key: str | None, timeout: float) -> AsyncClient:
    return AsyncClient(url, api_key, timeout=timeout)


class Client:
    """A connection to a Corral server for synchronous code.

    `url` defaults to `$CORRAL_URL` (else http://127.0.0.1:8470), `api_key` to
    `$CORRAL_API_KEY`.

    Example:
        >>> client = corral.Client(url="http://127.0.0.1:8470", api_key="corral_...")
        >>> with corral.Sandbox.create(client=client) as sandbox:
        ...     print(sandbox.run("echo hi").stdout)
        hi
    """

    def __init__(
        self, url: str | None = None, api_key: str | None = None, *, timeout: float = 300.0
    ) -> None:
        self._portal = _Portal()
        self._async = self._portal.call(_make_client(url, api_key, timeout))
        self.url = self._async.url

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of the async SDK on this client's event loop; its result."""
        return self._portal.call(coroutine)

    def list_pools(self) -> list[dict[str, Any]]:
        return self._portal.call(self._async.list_pools())

    def set_pool(self, name: str, size: int, **template: Any) -> dict[str, Any]:
        return self._portal.call(self._async.set_pool(name, size, **template))

    def remove_pool(self, name: str) -> None:
        self._portal.call(self._async.remove_pool(name))

    def events(self, sandbox_id: str | None = None) -> Iterator[dict[str, Any]]:
        """State changes of your sandboxes as they happen (see `AsyncClient.events`)."""
        stream = self._async.events(sandbox_id)
        try:
            while True:
                try:
                    yield self._portal.call(_next(stream))
                except StopAsyncIteration:
                    return
        finally:
            self._portal.call(stream.aclose())

    def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        return self._portal.call(self._async.list_snapshots())

    def get_snapshot(self, ref: str) -> SnapshotInfo:
        return self._portal.call(self._async.get_snapshot(ref))

    def delete_snapshot(self, ref: str) -> None:
        self._portal.call(self._async.delete_snapshot(ref))

    def list_images(self) -> builtins.list[BuiltImage]:
        return self._portal.call(self._async.list_images())

    def get_image(self, ref: str) -> BuiltImage:
        return self._portal.call(self._async.get_image(ref))

    def remove_image(self, ref: str) -> None:
        self._portal.call(self._async.remove_image(ref))

    def prune_images(self) -> dict[str, int]:
        return self._portal.call(self._async.prune_images())

    def image_usage(self) -> dict[str, int]:
        return self._portal.call(self._async.image_usage())

    def close(self) -> None:
        """Close the connections and stop the background event loop."""
        self._portal.call(self._async.aclose())
        self._portal.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def build_image(
    image: Image,
    name: str | None = None,
    *,
    client: Client | None = None,
    on_progress: Callable[[BuildEvent], object] | None = None,
) -> BuiltImage:
    """`Image.build` for synchronous code; `on_progress` runs on the client's portal thread."""
    sync = _client(client)
    return sync.call(_images.build_image(image, name, client=sync._async, on_progress=on_progress))


_default: Client | None = None
_default_lock = threading.Lock()


def _client(client: Client | None) -> Client:
    global _default  # noqa: PLW0603 - one lazily made default, like httpx's top-level functions
    if client is not None:
        return client
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


class Sandbox:
    """A sandbox on a Corral server, for synchronous code (see `AsyncSandbox` for details).

    Example:
        >>> with corral.Sandbox.create() as sandbox:
        ...     sandbox.run("python3 -c 'print(6*7)'").stdout
        '42\\n'
    """

    def __init__(self, client: Client, sandbox: AsyncSandbox) -> None:
        self.client = client
        self._async = sandbox
        self.files = Files(client, sandbox.files)

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def state(self) -> SandboxState:
        return self._async.state

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.state.value}>"

    @classmethod
    def create(
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
        volumes: Mapping[str, Volume | str] | None = None,
        pool: bool = True,
        auto_resume: bool = True,
        idle_timeout: float | None = None,
        on_idle: str = "pause",
        keep_alive: bool = False,
        on_timeout: str = "terminate",
        snapshot: str | SnapshotInfo | None = None,
        client: Client | None = None,
    ) -> Sandbox:
        """Create a sandbox and return once it can run commands.

        `volumes` maps mount points to volumes (`Volume`, or a volume's name or id):
        `{"/data": volume, "/ref": other.read_only()}`.
        """
        sync = _client(client)
        mounts = {
            path: volume._async if isinstance(volume, Volume) else volume
            for path, volume in (volumes or {}).items()
        }
        created = sync.call(
            AsyncSandbox.create(
                image,
                runtime,
                cpu=cpu,
                memory_mb=memory_mb,
                disk_mb=disk_mb,
                timeout=timeout,
                env=env,
                metadata=metadata,
                workdir=workdir,
                network=network,
                volumes=mounts,
                pool=pool,
                auto_resume=auto_resume,
                idle_timeout=idle_timeout,
                on_idle=on_idle,
                keep_alive=keep_alive,
                on_timeout=on_timeout,
                snapshot=snapshot,
                client=sync._async,
            )
        )
        return cls(sync, created)

    @classmethod
    def connect(cls, sandbox_id: str, *, client: Client | None = None) -> Sandbox:
        sync = _client(client)
        return cls(sync, sync.call(AsyncSandbox.connect(sandbox_id, client=sync._async)))

    @classmethod
    def list(
        cls,
        metadata: Mapping[str, str] | None = None,
        state: SandboxState | str | None = None,
        *,
        client: Client | None = None,
    ) -> list[SandboxInfo]:
        sync = _client(client)
        return sync.call(AsyncSandbox.list(metadata, state, client=sync._async))

    def info(self) -> SandboxInfo:
        return self.client.call(self._async.info())

    def set_timeout(self, seconds: float) -> SandboxInfo:
        return self.client.call(self._async.set_timeout(seconds))

    def terminate(self) -> SandboxInfo:
        return self.client.call(self._async.terminate())

    def pause(self) -> SandboxInfo:
        return self.client.call(self._async.pause())

    def resume(self) -> SandboxInfo:
        return self.client.call(self._async.resume())

    def snapshot_filesystem(self, name: str | None = None) -> BuiltImage:
        return self.client.call(self._async.snapshot_filesystem(name))

    def snapshot(self, name: str | None = None, ttl: float | None = None) -> SnapshotInfo:
        return self.client.call(self._async.snapshot(name, ttl))

    def fork(self, count: int) -> builtins.list[Sandbox]:
        return [Sandbox(self.client, made) for made in self.client.call(self._async.fork(count))]

    def hibernate(self) -> SandboxInfo:
        return self.client.call(self._async.hibernate())

    def wake(self) -> SandboxInfo:
        return self.client.call(self._async.wake())

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = 60,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run a command to completion (see `AsyncSandbox.run`)."""
        return self.client.call(
            self._async.run(cmd, timeout=timeout, env=env, cwd=cwd, user=user, stdin=stdin)
        )

    def exec(
        self,
        *argv: str,
        cmd: str | None = None,
        stdin: bool = False,
        pty: bool | tuple[int, int] = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], Awaitable[None] | None] | None = None,
        on_stderr: Callable[[bytes], Awaitable[None] | None] | None = None,
    ) -> Process:
        """Start a process and stream it (see `AsyncSandbox.exec`)."""
        process = self.client.call(
            self._async.exec(
                *argv,
                cmd=cmd,
                stdin=stdin,
                pty=pty,
                env=env,
                cwd=cwd,
                user=user,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        )
        return Process(self.client, process)

    def processes(self) -> builtins.list[ProcessInfo]:
        return self.client.call(self._async.processes())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()


class Volume:
    """A persistent volume, for synchronous code (see `AsyncVolume` for details).

    Example:
        >>> data = corral.Volume.from_name("data", create_if_missing=True)
        >>> with corral.Sandbox.create(volumes={"/data": data}) as sandbox:
        ...     sandbox.run("echo kept > /data/notes.txt")
        >>> with corral.Sandbox.create(volumes={"/data": data.read_only()}) as sandbox:
        ...     sandbox.run("cat /data/notes.txt").stdout
        'kept\\n'
    """

    def __init__(self, client: Client, volume: AsyncVolume) -> None:
        self.client = client
        self._async = volume

    @property
    def id(self) -> str:
        """The volume's id (`vol-…`)."""
        return self._async.id

    @property
    def name(self) -> str:
        """Its name, unique among your volumes."""
        return self._async.name

    @property
    def size_mb(self) -> int:
        """Its size in MiB, which is its quota."""
        return self._async.size_mb

    @property
    def created_at(self) -> float:
        """When it was made (Unix time)."""
        return self._async.created_at

    @property
    def used_bytes(self) -> int:
        """Bytes its files take, as of when fetched (`refresh()` fetches again)."""
        return self._async.used_bytes

    @property
    def sandboxes(self) -> tuple[str, ...]:
        """Your live sandboxes that mount it, as of when fetched."""
        return self._async.sandboxes

    @property
    def is_read_only(self) -> bool:
        """Whether this handle mounts the volume read-only."""
        return self._async.is_read_only

    def __repr__(self) -> str:
        mode = " read-only" if self.is_read_only else ""
        return f"<Volume {self.id} {self.name!r} {self.size_mb} MiB{mode}>"

    @classmethod
    def create(cls, name: str, *, size_mb: int = 1024, client: Client | None = None) -> Volume:
        """Make an empty volume (see `AsyncVolume.create`)."""
        sync = _client(client)
        return cls(sync, sync.call(AsyncVolume.create(name, size_mb=size_mb, client=sync._async)))

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        create_if_missing: bool = False,
        size_mb: int = 1024,
        client: Client | None = None,
    ) -> Volume:
        """Your volume by name or id, made if missing and asked to (see `AsyncVolume`)."""
        sync = _client(client)
        found = sync.call(
            AsyncVolume.from_name(
                name, create_if_missing=create_if_missing, size_mb=size_mb, client=sync._async
            )
        )
        return cls(sync, found)

    @classmethod
    def list(cls, *, client: Client | None = None) -> builtins.list[Volume]:
        """Your volumes, oldest first."""
        sync = _client(client)
        return [cls(sync, v) for v in sync.call(AsyncVolume.list(client=sync._async))]

    def refresh(self) -> Volume:
        """The volume as it is now (usage, sandboxes mounting it)."""
        return Volume(self.client, self.client.call(self._async.refresh()))

    def delete(self) -> None:
        """Delete the volume and its files (`VolumeInUse` while sandboxes mount it)."""
        self.client.call(self._async.delete())

    def read_only(self) -> Volume:
        """A handle on the same volume that sandboxes mount read-only."""
        return Volume(self.client, self._async.read_only())


class Output:
    """One output stream of a process: iterate it for chunks of bytes as they arrive."""

    def __init__(self, client: Client, output: AsyncOutput) -> None:
        self._client = client
        self._async = output

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                yield self._client.call(self._async.__anext__())
            except StopAsyncIteration:
                return

    def read(self) -> bytes:
        return self._client.call(self._async.read())


class Stdin:
    def __init__(self, client: Client, process: AsyncProcess) -> None:
        self._client = client
        self._async = process.stdin

    def write(self, data: bytes | str) -> None:
        self._client.call(self._async.write(data))

    def close(self) -> None:
        self._client.call(self._async.close())


class Process:
    """A process started with `Sandbox.exec` (see `AsyncProcess`)."""

    def __init__(self, client: Client, process: AsyncProcess) -> None:
        self._client = client
        self._async = process
        self.id = process.id
        self.pid = process.pid
        self.stdout = Output(client, process.stdout)
        self.stderr = Output(client, process.stderr)
        self.stdin = Stdin(client, process)

    def wait(self) -> int:
        return self._client.call(self._async.wait())

    def result(self) -> ProcessExit:
        return self._client.call(self._async.result())

    def signal(self, sig: str | int = "SIGTERM") -> None:
        self._client.call(self._async.signal(sig))

    def kill(self) -> None:
        self._client.call(self._async.kill())

    def resize(self, rows: int, cols: int) -> None:
        self._client.call(self._async.resize(rows, cols))

    def close(self) -> None:
        self._client.call(self._async.close())


class Files:
    """The files of a sandbox, for synchronous code (see `AsyncFiles`)."""

    def __init__(self, client: Client, files: AsyncFiles) -> None:
        self._client = client
        self._async = files

    def write(
        self,
        path: str,
        data: bytes | str | IO[bytes],
        *,
        mode: int | None = None,
        append: bool = False,
    ) -> int:
        return self._client.call(self._async.write(path, data, mode=mode, append=append))

    def read(self, path: str) -> bytes:
        return self._client.call(self._async.read(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self._client.call(self._async.read_text(path, encoding))

    def upload(self, local: str | os.PathLike[str], remote: str) -> int:
        return self._client.call(self._async.upload(local, remote))

    def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        return self._client.call(self._async.download(remote, local))

    def list(self, path: str, depth: int = 1) -> list[FileInfo]:
        return self._client.call(self._async.list(path, depth))

    def stat(self, path: str) -> FileInfo:
        return self._client.call(self._async.stat(path))

    def exists(self, path: str) -> bool:
        return self._client.call(self._async.exists(path))

    def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> FileInfo:
        return self._client.call(self._async.mkdir(path, parents=parents, mode=mode))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._client.call(self._async.remove(path, recursive=recursive))

    def rename(self, src: str, dst: str, *, overwrite: bool = False) -> FileInfo:
        return self._client.call(self._async.rename(src, dst, overwrite=overwrite))

    def chmod(self, path: str, mode: int) -> FileInfo:
        return self._client.call(self._async.chmod(path, mode))
