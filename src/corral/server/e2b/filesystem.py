"""envd's filesystem: the `filesystem.Filesystem` service (Stat, ListDir, MakeDir, Remove,
Move) and `/files` (download; upload as multipart or a raw body), over Corral's file API.

Paths are E2B's: absolute, or relative to the user's home (`/root` for the default user,
`/home/<user>` for a user the SDK names). The guest agent resolves them inside the sandbox, so
no path or symlink reaches the host's files, as with the native API.
"""

from __future__ import annotations

import asyncio
import posixpath
import stat
import zlib
from collections.abc import AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corral.core.errors import FileExists, InvalidRequest
from corral.core.models import FileInfo
from corral.server import audit
from corral.server.e2b import wire
from corral.server.e2b.gateway import handled, sandbox_caller
from corral.server.e2b.process import user_of
from corral.server.resources.sandboxes import SandboxFiles

TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
MAX_PARTS = 1000  # files in one multipart upload
CHUNK = 1024 * 1024

unary = handled(wire.connect_error)
plain = handled(wire.envd_error_of)


def resolve(path: object, user: str | None) -> str:
    """An E2B path as a sandbox path: relative ones from the user's home."""
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path is required")
    if path.startswith("/"):
        return path
    home = "/root" if user in (None, "root") else f"/home/{user}"
    return posixpath.join(home, path)


def entry(info: FileInfo) -> dict[str, Any]:
    """envd's `EntryInfo` for a file."""
    kind = stat.S_IFDIR if info.type == "dir" else stat.S_IFLNK if info.type == "symlink" else 0
    out: dict[str, Any] = {
        "name": info.name,
        "type": TYPES.get(info.type, "FILE_TYPE_UNSPECIFIED"),
        "path": info.path,
        "size": str(info.size),
        "mode": info.mode,
        "permissions": stat.filemode(kind | stat.S_IFREG * (kind == 0) | info.mode),
        "owner": "root" if info.uid == 0 else str(info.uid),
        "group": "root" if info.gid == 0 else str(info.gid),
        "modifiedTime": wire.timestamp(info.mtime),
    }
    if info.type == "symlink":
        out.update(isSymlink=True, symlinkTarget=info.target or "")
    return out


async def _files(request: Request) -> tuple[SandboxFiles, str | None, dict[str, Any]]:
    sandboxes, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    return await sandboxes.files(sandbox_id), user_of(request), body


@unary
async def stat_entry(request: Request) -> Response:
    files, user, body = await _files(request)
    return JSONResponse({"entry": entry(await files.stat(resolve(body.get("path"), user)))})


@unary
async def list_dir(request: Request) -> Response:
    files, user, body = await _files(request)
    depth = body.get("depth") or 1
    if not isinstance(depth, int):
        raise InvalidRequest("depth must be a whole number")
    found = await files.list(resolve(body.get("path"), user), depth)
    return JSONResponse({"entries": [entry(info) for info in found]})


@unary
async def make_dir(request: Request) -> Response:
    """MakeDir, with its parents; already_exists if something is there."""
    files, user, body = await _files(request)
    path = resolve(body.get("path"), user)
    audit.name("files.mkdir", path=path)
    if await files.exists(path):
        raise FileExists(f"{path} already exists")
    return JSONResponse({"entry": entry(await files.mkdir(path))})


@unary
async def remove(request: Request) -> Response:
    """Remove a file or a directory with what it holds."""
    files, user, body = await _files(request)
    path = resolve(body.get("path"), user)
    audit.name("files.remove", path=path, recursive=True)
    await files.stat(path)  # not_found for nothing there
    await files.remove(path, recursive=True)
    return JSONResponse({})


@unary
async def move(request: Request) -> Response:
    """Move (rename), replacing what is at the destination, as rename(2) does."""
    files, user, body = await _files(request)
    source = resolve(body.get("source"), user)
    destination = resolve(body.get("destination"), user)
    audit.name("files.rename", path=source, to=destination, overwrite=True)
    await files.stat(source)  # not_found before any other complaint
    return JSONResponse({"entry": entry(await files.rename(source, destination, overwrite=True))})


@unary
async def unimplemented(request: Request) -> Response:
    """Watching directories is not served (see docs/e2b.md)."""
    body = {"code": "unimplemented", "message": "Corral does not serve directory watches yet"}
    return JSONResponse(body, status_code=501)


@plain
async def download(request: Request) -> Response:
    """GET /files?path=: the file's bytes, streamed; 404 JSON when there is none."""
    sandboxes, sandbox_id = await sandbox_caller(request)
    user = request.query_params.get("username") or user_of(request)
    files = await sandboxes.files(sandbox_id)
    path = resolve(request.query_params.get("path"), user)
    audit.name("files.read", path=path)
    chunks = files.read(path)
    try:
        first = await anext(chunks)  # a missing file is a 404, not a broken stream
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        try:
            async with sandboxes.active(sandbox_id):
                yield first
                async for chunk in chunks:
                    yield chunk
        finally:
            await chunks.aclose()

    return StreamingResponse(body(), media_type="application/octet-stream")


@plain
async def upload(request: Request) -> Response:
    """POST /files: multipart (each part a file named by its filename, or by `path`) or a
    raw body (`path=`, optionally gzip); parents are made, files replaced."""
    sandboxes, sandbox_id = await sandbox_caller(request)
    user = request.query_params.get("username") or user_of(request)
    files = await sandboxes.files(sandbox_id)
    path = request.query_params.get("path")
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    with sandboxes.hold("upload"):
        async with sandboxes.active(sandbox_id):
            if kind == b"multipart/form-data":
                if not options.get(b"boundary"):
                    raise InvalidRequest("multipart/form-data needs a boundary")
                written = await _multipart(request, files, options[b"boundary"], path, user)
            else:
                target = resolve(path, user)
                body: AsyncIterator[bytes] = request.stream()
                if request.headers.get("content-encoding", "").lower() == "gzip":
                    body = _gunzip(body)
                await files.write(target, body)
                written = [target]
    audit.name("files.write", path=written[0] if len(written) == 1 else written)
    return JSONResponse(
        [{"name": posixpath.basename(p), "type": "file", "path": p} for p in written]
    )


async def _gunzip(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in body:
            data = chunk
            while data:  # at most CHUNK out per step, however much the input expands
                yield inflater.decompress(data, CHUNK)
                data = inflater.unconsumed_tail
        yield inflater.flush()
    except zlib.error:
        raise InvalidRequest("the body is not valid gzip") from None


class _Parts:
    """A multipart body's events as the parser finds them: a part's filename, its data, its end."""

    def __init__(self, boundary: bytes) -> None:
        self.events: list[tuple[str, Any]] = []
        self._field = b""
        self._value = b""
        self._filename: str | None = None
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": lambda: self.events.append(("file", self._filename)),
                "on_part_data": lambda data, start, end: self.events.append(
                    ("data", bytes(data[start:end]))
                ),
                "on_part_end": lambda: self.events.append(("end", None)),
            },
        )

    def _begin(self) -> None:
        self._filename = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            _, options = parse_options_header(self._value)
            name = options.get(b"filename")
            self._filename = name.decode(errors="replace") if name else None
        self._field = self._value = b""


async def _multipart(
    request: Request, files: SandboxFiles, boundary: bytes, path: str | None, user: str | None
) -> list[str]:
    """Write each part as it streams in; the paths written."""
    parts = _Parts(boundary)
    written: list[str] = []
    writer: tuple[str, asyncio.Queue[bytes | None], asyncio.Task[int]] | None = None
    try:
        async for chunk in request.stream():
            parts.parser.write(chunk)
            for kind, value in parts.events:
                if kind == "file":
                    if len(written) >= MAX_PARTS:
                        raise InvalidRequest(f"at most {MAX_PARTS} files in one upload")
                    target = resolve(value or path, user) if (value or path) else ""
                    if not target:
                        raise InvalidRequest("each part needs a filename (its path), or give path=")
                    queue: asyncio.Queue[bytes | None] = asyncio.Queue(8)
                    writer = (
                        target,
                        queue,
                        asyncio.create_task(files.write(target, _drain(queue))),
                    )
                elif writer is not None:
                    await _feed(writer[1], writer[2], value if kind == "data" else None)
                    if kind == "end":
                        await writer[2]
                        written.append(writer[0])
                        writer = None
            parts.events.clear()
    finally:
        if writer is not None:
            writer[2].cancel()
    if not written:
        raise InvalidRequest("the multipart body holds no file part")
    return written


async def _drain(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (chunk := await queue.get()) is not None:
        yield chunk


async def _feed(
    queue: asyncio.Queue[bytes | None], task: asyncio.Task[int], item: bytes | None
) -> None:
    """Hand `item` to a part's writer, or raise what stopped it."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        task.result()  # the writer failed: its error
        raise InvalidRequest("the file part was written before its end")


@plain
async def health(request: Request) -> Response:
    """envd's health: 204 while the sandbox runs, 502 once it is gone (the SDK's is_running)."""
    sandboxes, sandbox_id = await sandbox_caller(request)
    info = await sandboxes.info(sandbox_id)
    if info.state.value != "running":
        return wire.rest_error(
            502, f"The sandbox was not found: sandbox {sandbox_id} is {info.state.value}"
        )
    return wire.no_content()


ROUTES = [
    *(
        Route(f"/filesystem.Filesystem/{name}", handler, methods=["POST"])
        for name, handler in (
            ("Stat", stat_entry),
            ("ListDir", list_dir),
            ("MakeDir", make_dir),
            ("Remove", remove),
            ("Move", move),
            ("WatchDir", unimplemented),
            ("CreateWatcher", unimplemented),
            ("GetWatcherEvents", unimplemented),
            ("RemoveWatcher", unimplemented),
        )
    ),
    Route("/files", download, methods=["GET"]),
    Route("/files", upload, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
]
