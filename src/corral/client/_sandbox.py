"""Sandboxes as the SDK sees them: `AsyncSandbox` and its synchronous twin `Sandbox`."""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from corral.client._client import AsyncClient
from corral.client._code import AsyncCode
from corral.client._deployments import AsyncDeploys, Deployment
from corral.client._files import AsyncFiles, Files
from corral.client._image import Image
from corral.client._network import Network
from corral.client._previews import AsyncPreviews, Preview, previews_of
from corral.client._process import AsyncProcess, OutputCallback, Process
from corral.client._sync import (
    Client,
    Twin,
    async_client,
    blocking,
    blocking_as,
    blocking_self_each,
    constructor,
    static,
)
from corral.client._volumes import VolumeRef, mounts_body
from corral.core.errors import CommandTimeout
from corral.core.models import BuiltImage, ProcessInfo, SandboxInfo, SnapshotInfo, UsageSample
from corral.core.spec import DEFAULT_SPEC, FIXED_AT_START
from corral.core.state import SandboxState


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
    return SandboxInfo.from_dict(data)


def _create_body(
    spec: dict[str, Any],
    image: str | BuiltImage | None,
    volumes: Mapping[str, VolumeRef] | None,
    snapshot: str | SnapshotInfo | None,
    pool: bool,
) -> dict[str, Any]:
    """The body of `POST /v1/sandboxes`: the spec's fields, what the server would default to
    left out (the image, the workdir)."""
    body: dict[str, Any] = {"pool": pool, **spec}
    if body["workdir"] is None:
        del body["workdir"]
    if image is not None:
        body["image"] = image.id if isinstance(image, BuiltImage) else image
    if snapshot is not None:  # the snapshot decides what is fixed at start
        for name in FIXED_AT_START:
            body.pop(name, None)
        body["snapshot"] = snapshot.id if isinstance(snapshot, SnapshotInfo) else snapshot
    if volumes:
        body["volumes"] = mounts_body(volumes)
    return body


class AsyncSandbox(AsyncCode, AsyncPreviews, AsyncDeploys):
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
        self.files = AsyncFiles(client, info.id)

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def state(self) -> SandboxState:
        """The state when last fetched; `await info()` refreshes it."""
        return self._info.state

    @property
    def network(self) -> Network | None:
        """Its egress rules when last fetched (None: no network at all)."""
        spec = self._info.spec
        return None if spec.network == "none" else Network.of(spec.egress)

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} {self.state.value}>"

    @classmethod
    async def create(
        cls,
        image: str | Image | BuiltImage | None = None,
        runtime: str | None = None,
        *,
        cpu: float = DEFAULT_SPEC.cpu,
        memory_mb: int = DEFAULT_SPEC.memory_mb,
        disk_mb: int = DEFAULT_SPEC.disk_mb,
        max_processes: int = DEFAULT_SPEC.max_processes,
        timeout: float = DEFAULT_SPEC.timeout,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        workdir: str | None = DEFAULT_SPEC.workdir,
        network: str | Network = DEFAULT_SPEC.network,
        volumes: Mapping[str, VolumeRef] | None = None,
        pool: bool = True,
        auto_resume: bool = DEFAULT_SPEC.auto_resume,
        idle_timeout: float | None = DEFAULT_SPEC.idle_timeout,
        on_idle: str = DEFAULT_SPEC.on_idle,
        keep_alive: bool = DEFAULT_SPEC.keep_alive,
        on_timeout: str = DEFAULT_SPEC.on_timeout,
        snapshot: str | SnapshotInfo | None = None,
        client: AsyncClient | Client | None = None,
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
        `network` is "none" (the default), "internet", or a `Network` with egress rules:
        `Network(allow=["pypi.org", "*.pythonhosted.org"])` (see docs/network.md).
        `volumes` maps mount points to volumes (a `Volume`, or a volume's name or id):
        `{"/data": volume, "/ref": other.read_only()}`.
        A warm pool on the server whose template matches hands over a started sandbox, which
        is much faster; `pool=False` insists on a fresh start. Sandboxes with volumes always
        start fresh.
        """
        aio = async_client(client)
        if isinstance(image, Image):
            image = await image.build_async(client=aio)
        spec = {
            **dict(runtime=runtime, cpu=cpu, memory_mb=memory_mb, disk_mb=disk_mb),
            **dict(max_processes=max_processes, timeout=timeout, network=network),
            **dict(env=dict(env or {}), metadata=dict(metadata or {}), workdir=workdir),
            **dict(auto_resume=auto_resume, idle_timeout=idle_timeout, on_idle=on_idle),
            **dict(keep_alive=keep_alive, on_timeout=on_timeout),
        }
        if isinstance(network, Network):
            spec.update(network="internet", egress=network.to_dict())
        body = _create_body(spec, image, volumes, snapshot, pool)
        return cls(aio, parse_info(await aio.request("POST", "/v1/sandboxes", json=body)))

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, client: AsyncClient | Client | None = None
    ) -> AsyncSandbox:
        """An existing sandbox by id (`SandboxNotFound` if your key has none such).

        A paused or hibernated sandbox is resumed first, unless it was created with
        `auto_resume=False`.
        """
        aio = async_client(client)
        sandbox = cls(aio, parse_info(await aio.request("GET", f"/v1/sandboxes/{sandbox_id}")))
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
        client: AsyncClient | Client | None = None,
    ) -> builtins.list[SandboxInfo]:
        """Your sandboxes (ended ones for 7 days), optionally filtered."""
        aio = async_client(client)
        params: list[tuple[str, str]] = [
            ("metadata", f"{k}={v}") for k, v in (metadata or {}).items()
        ]
        if state is not None:
            params.append(("state", str(state)))
        return [
            parse_info(item) for item in await aio.request("GET", "/v1/sandboxes", params=params)
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

    async def metrics(self) -> builtins.list[UsageSample]:
        """Its CPU, memory, processes, disk and network, sampled every few seconds over the last
        ten minutes, oldest first (empty while hibernated or ended)."""
        data = await self.client.request("GET", self._path("/metrics"))
        return [UsageSample.from_dict(sample) for sample in data["samples"]]

    async def set_network(self, network: Network) -> SandboxInfo:
        """Change where this internet sandbox may connect, from now on (connections already
        open stay open); `Network()` drops its own rules, leaving the operator's."""
        body = network.to_dict()
        self._info = parse_info(await self.client.request("PUT", self._path("/network"), json=body))
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

    async def move(self, node: str | None = None) -> SandboxInfo:
        """Move to another node of a cluster (`node`, else the front picks one), keeping the
        id, memory and files (gvisor): hibernated there, and woken if it was running. Open
        streams to it end; a server on its own answers `not_a_cluster`."""
        body = {} if node is None else {"node": node}
        self._info = parse_info(await self.client.request("POST", self._path("/move"), json=body))
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

        Raises `CommandTimeout` (with `.result`) if it ran past `timeout` seconds. A process
        it leaves running in the background (`server &`) should write to a file: the command's
        output is read for about 1 s after it exits, and later writes to it fail.
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

    async def kill_all(self) -> int:
        """Kill every process in the sandbox but Corral's agent; return how many there were.
        The way back for a sandbox whose processes are out of control: its files stay, and
        new commands run as before."""
        data = await self.client.request("POST", self._path("/processes/kill-all"))
        return int(data["killed"])

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


class Sandbox(Twin[AsyncSandbox]):
    """A sandbox on a Corral server, for synchronous code (see `AsyncSandbox` for details).

    Example:
        >>> with corral.Sandbox.create() as sandbox:
        ...     sandbox.run("python3 -c 'print(6*7)'").stdout
        '42\\n'
    """

    def __init__(self, client: Client, sandbox: AsyncSandbox) -> None:
        super().__init__(client, sandbox)
        self.files = Files(client, sandbox.files)

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def state(self) -> SandboxState:
        """The state when last fetched; `info()` refreshes it."""
        return self._async.state

    @property
    def network(self) -> Network | None:
        """Its egress rules when last fetched (None: no network at all)."""
        return self._async.network

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.state.value}>"

    create = constructor(AsyncSandbox.create)
    connect = constructor(AsyncSandbox.connect)
    list = static(AsyncSandbox.list)
    info = blocking(AsyncSandbox.info)
    set_timeout = blocking(AsyncSandbox.set_timeout)
    set_network = blocking(AsyncSandbox.set_network)
    metrics = blocking(AsyncSandbox.metrics)
    terminate = blocking(AsyncSandbox.terminate)
    pause = blocking(AsyncSandbox.pause)
    resume = blocking(AsyncSandbox.resume)
    snapshot_filesystem = blocking(AsyncSandbox.snapshot_filesystem)
    snapshot = blocking(AsyncSandbox.snapshot)
    fork = blocking_self_each(AsyncSandbox.fork)
    hibernate = blocking(AsyncSandbox.hibernate)
    wake = blocking(AsyncSandbox.wake)
    move = blocking(AsyncSandbox.move)
    run = blocking(AsyncSandbox.run)
    exec = blocking_as(Process, AsyncSandbox.exec)
    processes = blocking(AsyncSandbox.processes)
    kill_all = blocking(AsyncSandbox.kill_all)
    run_code = blocking(AsyncSandbox.run_code)
    create_code_context = blocking(AsyncSandbox.create_code_context)
    list_code_contexts = blocking(AsyncSandbox.list_code_contexts)
    restart_code_context = blocking(AsyncSandbox.restart_code_context)
    remove_code_context = blocking(AsyncSandbox.remove_code_context)
    expose = blocking_as(Preview, AsyncSandbox.expose)
    previews = blocking_as(previews_of, AsyncSandbox.previews)
    deploy = blocking_as(Deployment, AsyncSandbox.deploy)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()
