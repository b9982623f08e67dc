"""Images defined in code: `Image.debian_slim().pip_install("numpy")`.

An `Image` is an immutable recipe: a base and a chain of steps, each method returning a new
image. Nothing happens until it is built (`Image.build`, or `Sandbox.create(image=...)`), on the
server, one cached layer per step.

On the wire a recipe is plain JSON (`Image.recipe`): the base and the steps, with local files
replaced by the sha256 of a tar of their content, uploaded beforehand. The server validates
recipes with `corral.core.recipe`, the same code the SDK uses, so both agree on what a step
means.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from corral.client._client import AsyncClient, default_client
from corral.client._sync import Client, sync_client
from corral.core.errors import ImageBuildFailed, InvalidRequest, ServiceUnavailable
from corral.core.models import BuildEvent, BuiltImage
from corral.core.recipe import MAX_STEPS, check_base, check_step

OnProgress = Callable[[BuildEvent], object]
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Image:
    """A recipe for a root filesystem; every method returns a new `Image`.

    Example:
        >>> image = Image.debian_slim().apt_install("git").pip_install("numpy==2.1.3")
        >>> image = image.env({"MODE": "prod"}).workdir("/app")
        >>> image.copy_local_dir("./src", "/app/src", ignore=["*.pyc"])  # doctest: +SKIP
    """

    base: Mapping[str, str] = field(default_factory=lambda: {"kind": "debian"})
    steps: tuple[Mapping[str, Any], ...] = ()

    # -- bases ------------------------------------------------------------------------------

    @classmethod
    def debian_slim(cls) -> Image:
        """Debian bookworm with python3 and pip: the default base."""
        return cls({"kind": "debian"})

    @classmethod
    def code_interpreter(cls) -> Image:
        """`debian_slim` with IPython, numpy, pandas, matplotlib and Node.js: the code
        interpreter's image (also usable by name, `image="code-interpreter"`)."""
        return cls({"kind": "code-interpreter"})

    @classmethod
    def host(cls) -> Image:
        """The server's own /usr, read-only: whatever the server machine has installed."""
        return cls({"kind": "host"})

    @classmethod
    def from_rootfs(cls, path: str | os.PathLike[str]) -> Image:
        """A root filesystem directory on this machine (sent to the server when built)."""
        return cls({"kind": "rootfs", "path": _local_dir(path)})

    @classmethod
    def from_oci_archive(cls, path: str | os.PathLike[str]) -> Image:
        """A `docker save` or OCI-layout tarball on this machine (sent when built)."""
        local = Path(path).expanduser()
        if not local.is_file():
            raise InvalidRequest(f"{path} is not a file; give a docker save or OCI archive")
        return cls({"kind": "oci_archive", "path": str(local.resolve())})

    @classmethod
    def from_registry(cls, reference: str) -> Image:
        """An image pulled by the server from an OCI registry, e.g. ``python:3.12-slim``."""
        return cls(check_base({"kind": "registry", "reference": reference}))

    # -- steps ------------------------------------------------------------------------------

    def apt_install(self, *packages: str) -> Image:
        """Install Debian packages (apt-get, without recommends; the lists are not kept)."""
        return self._step({"kind": "apt_install", "packages": list(packages)})

    def pip_install(self, *packages: str) -> Image:
        """Install Python packages into the image's python3 (pip, no cache kept)."""
        return self._step({"kind": "pip_install", "packages": list(packages)})

    def run_commands(self, *commands: str) -> Image:
        """Run shell commands in order, as root, with network; the first failure fails the build."""
        return self._step({"kind": "run_commands", "commands": list(commands)})

    def env(self, variables: Mapping[str, str]) -> Image:
        """Set environment variables for later steps and for every command in its sandboxes."""
        return self._step({"kind": "env", "env": dict(variables)})

    def workdir(self, path: str) -> Image:
        """The working directory of later `run_commands` and of commands in its sandboxes."""
        return self._step({"kind": "workdir", "path": path})

    def copy_local_file(self, src: str | os.PathLike[str], dst: str) -> Image:
        """Copy a file from this machine to `dst` in the image (a path ending in / is a dir)."""
        local = Path(src).expanduser()
        if not local.is_file():
            raise InvalidRequest(f"{src} is not a file on this machine", code="file_not_found")
        if dst.endswith("/"):
            dst += local.name
        return self._step({"kind": "copy", "src": str(local.resolve()), "dst": dst})

    def copy_local_dir(
        self, src: str | os.PathLike[str], dst: str, *, ignore: Sequence[str] = ()
    ) -> Image:
        """Copy a directory's content from this machine into `dst` in the image.

        `ignore` holds glob patterns matched against each path relative to `src` and against
        each file or directory name (``"*.pyc"``, ``".git"``, ``"build/*"``).
        """
        patterns = [ignore] if isinstance(ignore, str) else list(ignore)
        return self._step({"kind": "copy", "src": _local_dir(src), "dst": dst, "ignore": patterns})

    def _step(self, step: dict[str, Any]) -> Image:
        wire = {**step, "blob": "sha256:" + "0" * 64} if "src" in step else step
        check_step({k: v for k, v in wire.items() if k not in ("src", "ignore")})
        if len(self.steps) >= MAX_STEPS:
            raise InvalidRequest(f"an image has at most {MAX_STEPS} steps")
        return Image(self.base, (*self.steps, step))

    # -- building ---------------------------------------------------------------------------

    def build(
        self,
        name: str | None = None,
        *,
        client: Client | None = None,
        on_progress: OnProgress | None = None,
    ) -> BuiltImage:
        """Build on the server (every cached step is skipped) and return the built image.

        `on_progress` is called with each `BuildEvent` (step started, a line of its output),
        on the client's background thread; `ImageBuildFailed` says which step failed, with its
        output.
        """
        sync = sync_client(client)
        return sync.call(self.build_async(name, client=sync.aio, on_progress=on_progress))

    async def build_async(
        self,
        name: str | None = None,
        *,
        client: AsyncClient | None = None,
        on_progress: OnProgress | None = None,
    ) -> BuiltImage:
        """`build` for asyncio code."""
        client = client or default_client()
        with self.local_content() as files:
            blobs = {index: await _upload(client, path) for index, path in files.items()}
            recipe = self.recipe(blobs)
        body = {"recipe": recipe, "name": name}
        async with client.stream("POST", "/v1/images", json=body) as response:
            async for line in response.aiter_lines():
                if line.strip():
                    built = _on_event(json.loads(line), on_progress)
                    if built is not None:
                        return built
        raise ServiceUnavailable("the server ended the build's stream without a result; retry")

    # -- the wire format --------------------------------------------------------------------

    @contextlib.contextmanager
    def local_content(self) -> Iterator[dict[int, Path]]:
        """Files to upload for the parts of the recipe with local content (-1: the base).

        Archives are sent as they are; directories and copies are packed into temporary tars,
        removed on exit.
        """
        with tempfile.TemporaryDirectory(prefix="corral-image-") as temp:
            files: dict[int, Path] = {}
            if self.base["kind"] == "oci_archive":
                files[-1] = Path(self.base["path"])
            elif self.base["kind"] == "rootfs":
                files[-1] = Path(temp) / "rootfs.tar"
                with tarfile.open(files[-1], "w", format=tarfile.PAX_FORMAT) as tar:
                    for path in _walk(Path(self.base["path"]), Path(self.base["path"]), ()):
                        name = path.relative_to(self.base["path"]).as_posix()
                        _add(tar, path, tar.gettarinfo(str(path), name))
            for index, step in enumerate(self.steps):
                if "src" in step:
                    files[index] = Path(temp) / f"step-{index}.tar"
                    with tarfile.open(files[index], "w", format=tarfile.PAX_FORMAT) as tar:
                        pack(tar, Path(step["src"]), step["dst"], step.get("ignore", ()))
            yield files

    def recipe(self, blobs: Mapping[int, str] | None = None) -> dict[str, Any]:
        """The JSON recipe, local content named by the digests in `blobs` (see local_content)."""
        blobs = blobs or {}
        base = dict(self.base)
        if "path" in base:
            base = {"kind": base["kind"], "blob": blobs.get(-1, "")}
        steps = [
            {"kind": "copy", "blob": blobs.get(i, ""), "dst": s["dst"]} if "src" in s else dict(s)
            for i, s in enumerate(self.steps)
        ]
        return {"base": base, "steps": steps}


# -- local content ------------------------------------------------------------------------------


def _local_dir(path: str | os.PathLike[str]) -> str:
    local = Path(path).expanduser()
    if not local.is_dir():
        raise InvalidRequest(f"{path} is not a directory on this machine", code="file_not_found")
    return str(local.resolve())


def pack(tar: tarfile.TarFile, src: Path, dst: str, ignore: Sequence[str] = ()) -> None:
    """Add `src` (a file, or a directory's content) to `tar`, placed at `dst` in the image.

    Deterministic: names sorted, owner root, times zeroed. The same content gives the same
    bytes, hence the same digest and a cache hit, however often the files were touched.
    Parent directories are not included: the build creates missing ones and follows existing
    ones, symlinks included, as `cp` would.
    """
    target = PurePosixPath(dst.lstrip("/") or ".")
    if src.is_file():
        _add(tar, src, _normalised(tar.gettarinfo(str(src), str(target))))
        return
    if str(target) != ".":
        _add(tar, src, _normalised(tar.gettarinfo(str(src), str(target))))
    for path in _walk(src, src, ignore):
        name = str(target / path.relative_to(src).as_posix())
        _add(tar, path, _normalised(tar.gettarinfo(str(path), name)))


def _walk(root: Path, directory: Path, ignore: Sequence[str]) -> Iterator[Path]:
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(entry.path)
        relative = path.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(entry.name, p) for p in ignore):
            continue
        yield path
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(root, path, ignore)


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def _add(tar: tarfile.TarFile, path: Path, info: tarfile.TarInfo) -> None:
    if info.isreg():
        with path.open("rb") as handle:
            tar.addfile(info, handle)
    elif info.isdir() or info.issym() or info.islnk():
        tar.addfile(info)
    # sockets, devices and fifos are not content: skipped


# -- talking to the server ----------------------------------------------------------------------


def _on_event(event: Mapping[str, Any], on_progress: OnProgress | None) -> BuiltImage | None:
    """The image once the build is done; progress goes to `on_progress`; failures raise."""
    kind = event.get("event")
    if kind == "done":
        return BuiltImage.from_dict(event["image"])
    if kind == "error":
        error = event["error"]
        raise ImageBuildFailed(
            error["message"],
            code=error["code"],
            step=event.get("step") or 0,
            log=event.get("log") or "",
        )
    if on_progress is not None:
        on_progress(
            BuildEvent(
                kind=str(kind),
                step=event["step"],
                steps=event.get("steps"),
                description=event.get("description"),
                cached=event.get("cached"),
                line=event.get("line"),
            )
        )
    return None


async def _upload(client: AsyncClient, path: Path) -> str:
    """Send a file's content unless the server has it already; its digest."""
    import asyncio

    digest = "sha256:" + await asyncio.to_thread(_sha256, path)
    if not await client.has_blob(digest):
        await client.request("PUT", f"/v1/blobs/{digest}", content=_read(path))
    return digest


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


async def _read(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk
