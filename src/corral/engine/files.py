"""File operations on a sandbox, carried out by its guest agent.

Paths are checked for shape here (absolute, no NUL) and resolved by the agent inside the
sandbox, so `..` and symlinks only ever reach the sandbox's own files. Content streams in
chunks under flow control: a 1 GiB file is never held in memory on either side.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import Any

from corral.agent import protocol as P
from corral.core.errors import FileNotFound, InvalidRequest
from corral.core.models import FileInfo
from corral.core.spec import check_sandbox_path
from corral.engine.agentlink import AgentLink, unwrap


class SandboxFiles:
    """The file API of one sandbox."""

    def __init__(
        self, link: AgentLink, ready: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        self._agent = link
        self._ready = ready  # run before each operation (the engine wakes a sleeping sandbox)

    async def _link(self) -> AgentLink:
        if self._ready is not None:
            await self._ready()
        return self._agent

    async def read(self, path: str) -> AsyncGenerator[bytes, None]:
        """Yield the file's content in chunks as it arrives."""
        check_sandbox_path(path)
        async for kind, payload in (await self._link()).stream(P.FS_READ, {"path": path}):
            if kind == P.FILE:
                yield payload
            elif kind == P.REPLY:
                unwrap(payload)

    async def read_bytes(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(path)])

    async def write(
        self,
        path: str,
        data: bytes | str | AsyncIterable[bytes],
        *,
        mode: int | None = None,
        append: bool = False,
    ) -> int:
        """Write `data` to `path` (parents created); return the bytes written.

        A whole-file write lands atomically: readers see the old or the new content, and a
        failed write leaves the old content.
        """
        check_sandbox_path(path)
        if mode is not None:
            check_mode(mode)
        params: dict[str, Any] = {"path": path, "append": append}
        if mode is not None:
            params["mode"] = mode
        channel = await (await self._link()).open(P.FS_WRITE, params)
        try:
            if isinstance(data, str):
                data = data.encode()
            if isinstance(data, bytes):
                await channel.send_data(P.FILE, data)
            else:
                async for chunk in data:
                    if channel.finished:
                        break
                    await channel.send_data(P.FILE, chunk)
            await channel.send_eof(P.FILE)
        except BaseException:
            await channel.cancel()
            raise
        result = await channel.result()
        return int(result["bytes"])

    async def list(self, path: str, depth: int = 1) -> list[FileInfo]:
        """Entries under `path`, down to `depth` levels (1: the directory itself)."""
        check_sandbox_path(path)
        if not isinstance(depth, int) or not 1 <= depth <= 64:
            raise InvalidRequest("depth must be between 1 and 64")
        result = await (await self._link()).call(P.FS_LIST, {"path": path, "depth": depth})
        return [FileInfo.from_guest(entry) for entry in result["entries"]]

    async def stat(self, path: str) -> FileInfo:
        """What is at `path` (a symlink is described, not followed)."""
        return await self._info(P.FS_STAT, {"path": check_sandbox_path(path)})

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFound:
            return False
        return True

    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> FileInfo:
        return await self._info(
            P.FS_MKDIR,
            {"path": check_sandbox_path(path), "parents": parents, "mode": check_mode(mode)},
        )

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await (await self._link()).call(
            P.FS_REMOVE, {"path": check_sandbox_path(path), "recursive": recursive}
        )

    async def rename(self, src: str, dst: str, *, overwrite: bool = False) -> FileInfo:
        params = {
            "src": check_sandbox_path(src, "src"),
            "dst": check_sandbox_path(dst, "dst"),
            "overwrite": overwrite,
        }
        return await self._info(P.FS_RENAME, params)

    async def chmod(self, path: str, mode: int) -> FileInfo:
        params = {"path": check_sandbox_path(path), "mode": check_mode(mode)}
        return await self._info(P.FS_CHMOD, params)

    async def _info(self, method: str, params: dict[str, Any]) -> FileInfo:
        return FileInfo.from_guest(await (await self._link()).call(method, params))


def check_mode(mode: object) -> int:
    """A file mode as the file API takes it: permission and special bits, nothing more."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InvalidRequest("mode must be an integer between 0 and 0o7777 (e.g. 0o755)")
    return mode
