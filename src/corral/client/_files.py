"""The files of a sandbox: `AsyncFiles` and its synchronous twin `Files`.

Paths are absolute paths inside the sandbox, resolved there by its guest agent; content streams
in both directions, so a file of any size the sandbox's disk holds can go in or out.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import IO, Any

from corral.client._client import AsyncClient
from corral.client._sync import Twin, blocking, blocking_iter
from corral.core.errors import FileNotFound
from corral.core.models import FileInfo

CHUNK = 1024 * 1024
Data = bytes | str | IO[bytes] | AsyncIterable[bytes]


class AsyncFiles:
    """The files of a sandbox (`sandbox.files`). Paths are absolute paths inside the sandbox."""

    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/files"

    def _path(self, suffix: str = "") -> str:
        return self._base + suffix

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
        import asyncio

        handle = await asyncio.to_thread(open, local, "rb")
        try:
            return await self.write(remote, handle)
        finally:
            handle.close()

    async def download(self, remote: str, local: str | os.PathLike[str]) -> int:
        """Copy a file out of the sandbox, streamed; the local file appears only when complete."""
        import asyncio

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
    import asyncio

    while True:
        chunk = await asyncio.to_thread(handle.read, CHUNK)
        if not chunk:
            return
        yield chunk


class Files(Twin[AsyncFiles]):
    """The files of a sandbox, for synchronous code (see `AsyncFiles`)."""

    write = blocking(AsyncFiles.write)
    read_stream = blocking_iter(AsyncFiles.read_stream)
    read = blocking(AsyncFiles.read)
    read_text = blocking(AsyncFiles.read_text)
    upload = blocking(AsyncFiles.upload)
    download = blocking(AsyncFiles.download)
    list = blocking(AsyncFiles.list)
    stat = blocking(AsyncFiles.stat)
    exists = blocking(AsyncFiles.exists)
    mkdir = blocking(AsyncFiles.mkdir)
    remove = blocking(AsyncFiles.remove)
    rename = blocking(AsyncFiles.rename)
    chmod = blocking(AsyncFiles.chmod)
