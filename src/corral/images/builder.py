"""Building images from recipes (`corral.Image`): one sandbox and one cached layer per step.

Each step that changes files runs in a build sandbox started from the image so far: the
`namespaces` runtime, with network (package managers need it), no host access and the usual
limits. Build steps are untrusted code like any other. When the step's commands succeed, the
sandbox's writable layer (only what the step changed, in overlayfs's format) is copied out as
a new layer, keyed by the sha256 of the parent's key and the step (whose copied content is
itself named by digest). The same recipe therefore maps to the same keys: a rebuild finds
every layer and runs nothing.

A step that fails leaves nothing: its sandbox ends, its layer directory is discarded, and the
error names the step and carries the end of its output. Builds of the same step by concurrent
requests, or by two servers on one data directory, happen once (an in-process future and a
file lock per key).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import shlex
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from corral.core.errors import CorralError, ImageBuildFailed, InvalidRequest
from corral.core.models import ExecResult, SandboxInfo
from corral.core.names import BUILTIN_IMAGES
from corral.core.recipe import check_recipe, describe
from corral.core.spec import SandboxSpec
from corral.images import lanes, oci
from corral.images.layers import LayerStore, Manifest, chain_key, image_id
from corral.images.oci.egress import Egress
from corral.images.store import ImageStore

log = logging.getLogger("corral.images.builder")

BUILD_RUNTIME = "namespaces"  # the one whose writable layer is a directory on the host
STEP_TIMEOUT = 1800.0
LOG_TAIL = 60  # lines of a failed step's output kept in the error
BUILD_SPEC = SandboxSpec(
    runtime=BUILD_RUNTIME,
    cpu=2.0,
    memory_mb=4096,
    disk_mb=16384,
    max_processes=2048,
    timeout=STEP_TIMEOUT + 60,
    network="internet",
)
EXTRACT = (
    "import sys, tarfile\n"
    "extra = {'filter': 'fully_trusted'} if hasattr(tarfile, 'fully_trusted_filter') else {}\n"
    "with tarfile.open(sys.argv[1]) as tar:\n"
    "    tar.extractall('/', numeric_owner=True, **extra)\n"
)

# Build events, as dicts so they go onto the wire unchanged (see docs/http-api.md):
#   {"event": "step", "step": N, "steps": M, "description": …, "cached": bool}
#   {"event": "log", "step": N, "line": …}
BuildProgress = Callable[[dict[str, Any]], None]


class RunningCommand(Protocol):
    def output(self) -> AsyncIterator[tuple[str, bytes]]: ...

    async def wait(self) -> ExecResult: ...


class FileWriter(Protocol):
    async def write(self, path: str, data: AsyncIterable[bytes]) -> int: ...


class SandboxHost(Protocol):
    """What a build needs of the engine (`corral.engine.Engine` is one): sandboxes to run its
    steps in, their output, and the changes they made."""

    images: ImageStore

    async def create(self, spec: SandboxSpec, *, pool: bool = True) -> SandboxInfo: ...

    def get(self, sandbox_id: str) -> SandboxInfo: ...

    async def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str] | None = None,
        *,
        cmd: str | None = None,
        timeout: float | None = None,
    ) -> RunningCommand: ...

    def files(self, sandbox_id: str) -> FileWriter: ...

    async def export_changes(self, sandbox_id: str, dest: Path) -> None: ...

    async def terminate(self, sandbox_id: str) -> SandboxInfo: ...


class Builder:
    """Builds recipes into manifests of `engine`'s layer store."""

    def __init__(self, engine: SandboxHost, egress: Egress) -> None:
        self.engine = engine
        self.egress = egress  # where registry pulls may connect
        self.store: LayerStore = engine.images.built
        self._building: dict[str, asyncio.Future[Manifest]] = {}

    async def build(
        self, recipe: Any, progress: BuildProgress | None = None, *, scope: str = ""
    ) -> Manifest:
        """Build `recipe` (JSON, see `Image.recipe`); returns the image of its last step.

        Builds in different `scope`s (the server's API keys) share no cached layer, so a build
        cannot tell, by `cached` or by its speed, what another scope has built.

        Any failure is an `ImageBuildFailed` naming the step (0 is the base), with the code
        of what went wrong (`invalid_oci_archive`, `registry_unreachable`, …).
        """
        base, steps = check_recipe(recipe)
        emit = progress or (lambda _event: None)
        lines = [_base_line(base), *(describe(step) for step in steps)]
        image: Manifest | None = None
        for number, step in enumerate([base, *steps]):
            key = chain_key(image.key if image else scope, step)
            emit(
                {
                    "event": "step",
                    "step": number,
                    "steps": len(steps),
                    "description": lines[number],
                    "cached": self.store.manifest(image_id(key)) is not None,
                }
            )
            make = (
                functools.partial(self._base, base=step, emit=emit)
                if image is None
                else functools.partial(
                    self._step, parent=image, step=step, number=number, emit=emit
                )
            )
            try:
                image = await self._once(key, make)
            except ImageBuildFailed:
                raise
            except CorralError as exc:
                raise ImageBuildFailed(
                    f"step {number} ({lines[number]}): {exc.message}", code=exc.code, step=number
                ) from exc
        assert image is not None
        return image

    async def _once(self, key: str, make: Callable[[str], Awaitable[Manifest]]) -> Manifest:
        """The image of `key`: from the store, from a build under way, or built now."""
        found = self.store.manifest(image_id(key))
        if found is not None:
            return found
        if key in self._building:
            building = self._building[key]
            try:
                return await asyncio.shield(building)
            except asyncio.CancelledError:
                if not building.cancelled():
                    raise  # this build was cancelled, not the one it waited for
                return await self._once(key, make)  # that one's client left: build it here
        future: asyncio.Future[Manifest] = asyncio.get_running_loop().create_future()
        self._building[key] = future
        try:
            async with self._file_lock(key):
                found = self.store.manifest(image_id(key))  # another server built it meanwhile
                manifest = found if found is not None else await make(key)
            future.set_result(manifest)
            return manifest
        except asyncio.CancelledError:
            future.cancel()  # those waiting build it themselves
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._building[key]

    @contextlib.asynccontextmanager
    async def _file_lock(self, key: str) -> Any:
        while True:
            try:
                with self.store.lock(key, wait=False):
                    yield
                    return
            except BlockingIOError:
                await asyncio.sleep(0.2)

    # -- snapshots of sandboxes ----------------------------------------------------------------

    async def snapshot_filesystem(self, sandbox_id: str) -> Manifest:
        """A new image: the sandbox's image with what the sandbox changed as one more layer.

        The sandbox is frozen while its writable layer is copied, then goes on. Every snapshot
        is a new image (its layer's key is random: the content of a live filesystem names
        nothing reproducible).
        """
        info = self.engine.get(sandbox_id)
        image = info.spec.image
        if image.startswith("im-"):
            parent = self.store.manifest(image)
            if parent is None:
                raise ImageBuildFailed(
                    f"the image {image} of sandbox {sandbox_id} was pruned; cannot stack on it",
                    code="image_not_found",
                )
        elif image not in BUILTIN_IMAGES:
            raise InvalidRequest(
                f"sandbox {sandbox_id} runs the locally registered image {image!r}, which "
                "cannot be stacked on; snapshot sandboxes of built-in or built images"
            )
        else:
            base = {"kind": image}
            parent = await self._once(
                chain_key("", base), functools.partial(self._base, base=base, emit=_ignore)
            )
        key = chain_key(parent.key, {"kind": "snapshot", "nonce": secrets.token_hex(16)})
        with self.store.new_layer(key) as layer:
            await self.engine.export_changes(sandbox_id, layer)
        return self._on_top(parent, key, f"snapshot of {sandbox_id}", layer=True)

    # -- bases ------------------------------------------------------------------------------

    async def _base(self, key: str, *, base: Mapping[str, Any], emit: BuildProgress) -> Manifest:
        kind = base["kind"]
        if kind in BUILTIN_IMAGES:
            await lanes.IMAGES.run(
                self.engine.images.resolve, kind, lambda line: _log(emit, 0, line)
            )
            return self._save(Manifest(image_id(key), key, kind, (), steps=(_base_line(base),)))
        with tempfile.TemporaryDirectory(prefix="oci-", dir=self.store.root) as temp:
            work = Path(temp)
            if kind == "rootfs":
                blob = self.store.blob(base["blob"])
                self._need_blob(blob, 0)
                image = oci.OciImage((blob,), (base["blob"],), oci.OciConfig({}, None, None, None))
            elif kind == "oci_archive":
                blob = self.store.blob(base["blob"])
                self._need_blob(blob, 0)
                image = await lanes.IMAGES.run(oci.read_archive, blob, work)
            else:
                image = await lanes.IMAGES.run(
                    oci.pull,
                    base["reference"],
                    work,
                    egress=self.egress,
                    progress=lambda line: _log(emit, 0, line),
                )
            layers: list[str] = []
            parent = key
            budget = oci.Budget(oci.MAX_IMAGE_BYTES, 4 * oci.MAX_MEMBERS, "the image")
            for path, digest in zip(image.layers, image.digests, strict=True):
                parent = chain_key(parent, {"kind": "layer", "digest": digest})
                if not self.store.has_layer(parent):
                    _log(emit, 0, f"unpacking layer {digest[:19]}…")
                    await lanes.IMAGES.run(self._unpack, path, parent, budget)
                layers.append(parent)
        config = image.config
        return self._save(
            Manifest(
                image_id(key),
                key,
                "",
                tuple(layers),
                env=config.env,
                workdir=config.workdir,
                steps=(_base_line(base),),
            )
        )

    def _unpack(self, blob: Path, key: str, budget: oci.Budget) -> None:
        oci.unpack_layer(blob, self.store.layer(key), budget)  # atomic: aside, then renamed

    def _need_blob(self, blob: Path, step: int) -> None:
        if not blob.is_file():
            raise ImageBuildFailed(
                f"step {step}: the uploaded content {blob.name[:12]}… is missing; "
                "upload it (PUT /v1/blobs/sha256:…) and retry",
                code="blob_not_found",
                step=step,
            )

    # -- steps ------------------------------------------------------------------------------

    async def _step(
        self,
        key: str,
        *,
        parent: Manifest,
        step: Mapping[str, Any],
        number: int,
        emit: BuildProgress,
    ) -> Manifest:
        kind = step["kind"]
        line = describe(step)
        if kind == "env":
            return self._on_top(parent, key, line, env={**parent.env, **step["env"]})
        if not self.store.has_layer(key):  # it may outlive a pruned manifest
            await self._run_in_sandbox(key, parent, step, number, emit)
        workdir = step["path"] if kind == "workdir" else parent.workdir
        return self._on_top(parent, key, line, layer=True, workdir=workdir)

    async def _run_in_sandbox(
        self, key: str, parent: Manifest, step: Mapping[str, Any], number: int, emit: BuildProgress
    ) -> None:
        engine = self.engine
        spec = replace(
            BUILD_SPEC,
            image=parent.id,
            network="none" if step["kind"] in ("copy", "workdir") else "internet",
        )
        tail: list[str] = []

        def output(text: str) -> None:
            for piece in text.splitlines():
                tail.append(piece)
                del tail[:-LOG_TAIL]
                _log(emit, number, piece)

        try:
            sandbox = await engine.create(spec, pool=False)
        except CorralError as exc:
            raise ImageBuildFailed(
                f"step {number} ({describe(step)}): could not start its build sandbox: "
                f"{exc.message}",
                step=number,
            ) from exc
        try:
            for command in await self._commands(sandbox.id, step, number):
                code = await self._run(sandbox.id, command, output)
                if code != 0:
                    how = (
                        f"ran past {STEP_TIMEOUT:.0f} s and was killed"
                        if code is None
                        else f"exited with {code}"
                    )
                    raise ImageBuildFailed(
                        f"step {number} ({describe(step)}) failed: `{command}` {how}",
                        step=number,
                        log="\n".join(tail),
                    )
            with self.store.new_layer(key) as layer:
                await engine.export_changes(sandbox.id, layer)
        finally:
            with contextlib.suppress(CorralError):
                await engine.terminate(sandbox.id)

    async def _commands(self, sandbox_id: str, step: Mapping[str, Any], number: int) -> list[str]:
        kind = step["kind"]
        if kind == "apt_install":
            packages = " ".join(shlex.quote(p) for p in step["packages"])
            return [
                "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                f"--no-install-recommends {packages} && apt-get clean && "
                "rm -rf /var/lib/apt/lists/*"
            ]
        if kind == "pip_install":
            packages = " ".join(shlex.quote(p) for p in step["packages"])
            # Debian's python refuses system-wide installs unless told; an image is the place.
            return [
                "PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore "
                f"python3 -m pip install --no-cache-dir --disable-pip-version-check {packages}"
            ]
        if kind == "run_commands":
            return list(step["commands"])
        if kind == "workdir":
            return [f"mkdir -p {shlex.quote(step['path'])}"]
        blob = self.store.blob(step["blob"])
        self._need_blob(blob, number)
        archive = "/tmp/.corral-copy.tar"  # /tmp is not part of the layer
        with blob.open("rb") as handle:
            await self.engine.files(sandbox_id).write(archive, _chunks(handle))
        return [f"python3 -c {shlex.quote(EXTRACT)} {archive}"]

    async def _run(
        self, sandbox_id: str, command: str, output: Callable[[str], None]
    ) -> int | None:
        """Run `command`, its output (stderr merged) to `output` by line; its exit code, or
        None if it timed out."""
        process = await self.engine.exec(sandbox_id, cmd=command + " 2>&1", timeout=STEP_TIMEOUT)
        pending = ""
        async for _stream, data in process.output():
            pending += data.decode(errors="replace")
            complete, _, pending = pending.rpartition("\n")
            if complete:
                output(complete)
        if pending:
            output(pending)
        result = await process.wait()
        if result.timed_out:
            return None
        return result.exit_code if result.exit_code is not None else 128 + (result.signal or 0)

    def _on_top(
        self, parent: Manifest, key: str, line: str, *, layer: bool = False, **changes: Any
    ) -> Manifest:
        """Save image `key`: `parent` plus one step (its layer `key`, if it made one)."""
        return self._save(
            replace(
                parent,
                id=image_id(key),
                key=key,
                layers=(*parent.layers, key) if layer else parent.layers,
                steps=(*parent.steps, line),
                created_at=time.time(),
                **changes,
            )
        )

    def _save(self, manifest: Manifest) -> Manifest:
        size = sum(self.store.layer_size(k) for k in manifest.layers)
        manifest = replace(manifest, size_bytes=size, created_at=manifest.created_at or time.time())
        self.store.save(manifest)
        return manifest


def _base_line(base: Mapping[str, Any]) -> str:
    kind = base["kind"]
    if kind == "registry":
        return f"from_registry {base['reference']}"
    if kind in ("rootfs", "oci_archive"):
        return f"from_{kind} {base['blob'][:19]}…"
    return {"debian": "debian_slim", "code-interpreter": "code_interpreter", "host": "host"}[kind]


def _ignore(_event: dict[str, Any]) -> None:
    pass


def _log(emit: BuildProgress, step: int, line: str) -> None:
    emit({"event": "log", "step": step, "line": line})


async def _chunks(handle: Any) -> Any:
    while chunk := handle.read(1024 * 1024):
        yield chunk
