"""Images defined in code: `Image.debian_slim().pip_install("numpy")`.

An `Image` is an immutable recipe: a base and a chain of steps, each method returning a new
image. Nothing happens until it is built (`Image.build`, or `Sandbox.create(image=...)`), on the
server, one cached layer per step; see `corral.builder`.

On the wire a recipe is plain JSON (`Image.recipe`): the base and the steps, with local files
replaced by the sha256 of a tar of their content, uploaded beforehand. The server validates
recipes with `check_recipe`, the same code the SDK uses, so both agree on what a step means.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from corral.errors import InvalidRequest
from corral.spec import check_env, check_sandbox_path

if TYPE_CHECKING:
    from corral.client._client import AsyncClient
    from corral.models import BuildEvent, BuiltImage

    OnProgress = Callable[[BuildEvent], object]
    from corral.client._sync import Client

BASES = ("debian", "host", "rootfs", "oci_archive", "registry")
STEPS = ("apt_install", "pip_install", "run_commands", "env", "workdir", "copy")
MAX_STEPS = 100
MAX_ARGS = 1000
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Package names and version specifiers, never shell syntax: they are quoted anyway.
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:~=<>!,\[\]@/ -]*$")
_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._:/@+-]*$", re.IGNORECASE)


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

        `on_progress` is called with each `BuildEvent` (step started, a line of its output);
        `ImageBuildFailed` says which step failed, with its output.
        """
        from corral.client._sync import build_image  # noqa: PLC0415 - the client imports us

        return build_image(self, name, client=client, on_progress=on_progress)

    async def build_async(
        self,
        name: str | None = None,
        *,
        client: AsyncClient | None = None,
        on_progress: OnProgress | None = None,
    ) -> BuiltImage:
        """`build` for asyncio code."""
        from corral.client._images import build_image  # noqa: PLC0415 - the client imports us

        return await build_image(self, name, client=client, on_progress=on_progress)

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


def describe(step: Mapping[str, Any]) -> str:
    """A step in one line, for progress and errors."""
    kind = step["kind"]
    if kind in ("apt_install", "pip_install"):
        return f"{kind} {' '.join(step['packages'])}"
    if kind == "run_commands":
        return "run_commands " + " && ".join(step["commands"])
    if kind == "env":
        return "env " + " ".join(f"{k}=…" for k in step["env"])
    if kind == "workdir":
        return f"workdir {step['path']}"
    return f"copy to {step['dst']}"


# -- validation (shared by the SDK and the server) ----------------------------------------------


def check_recipe(recipe: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The base and steps of a JSON recipe, or `InvalidRequest` naming what is wrong."""
    if not isinstance(recipe, dict) or set(recipe) - {"base", "steps"}:
        raise InvalidRequest("a recipe is an object with 'base' and 'steps'")
    steps = recipe.get("steps", [])
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        raise InvalidRequest(f"'steps' must be a list of at most {MAX_STEPS} steps")
    checked = []
    for index, step in enumerate(steps, 1):
        try:
            checked.append(check_step(step))
        except InvalidRequest as exc:
            raise InvalidRequest(f"step {index}: {exc.message}") from None
    return check_base(recipe.get("base", {"kind": "debian"})), checked


def check_base(base: Any) -> dict[str, Any]:
    kind = base.get("kind") if isinstance(base, dict) else None
    if kind not in BASES:
        raise InvalidRequest(
            f"unknown base {kind!r}; use one of {', '.join(BASES)}", code="unknown_base"
        )
    fields = {"debian": set(), "host": set(), "registry": {"reference"}}.get(kind, {"blob"})
    if set(base) - {"kind"} != fields:
        raise InvalidRequest(f"a {kind} base takes {sorted(fields) or 'no fields'}")
    if kind == "registry":
        reference = base["reference"]
        if not isinstance(reference, str) or not _REFERENCE.match(reference) or ".." in reference:
            raise InvalidRequest(
                f"{reference!r} is not an image reference such as 'python:3.12-slim' or "
                "'localhost:5000/team/tools@sha256:…'"
            )
    elif fields == {"blob"}:
        _check_digest(base["blob"])
    return dict(base)


def check_step(step: Any) -> dict[str, Any]:
    kind = step.get("kind") if isinstance(step, dict) else None
    if kind not in STEPS:
        raise InvalidRequest(f"unknown step {kind!r}; use one of {', '.join(STEPS)}")
    fields = {
        "apt_install": {"packages"},
        "pip_install": {"packages"},
        "run_commands": {"commands"},
        "env": {"env"},
        "workdir": {"path"},
        "copy": {"blob", "dst"},
    }[kind]
    if set(step) - {"kind"} != fields:
        raise InvalidRequest(f"a {kind} step takes {sorted(fields)}")
    if kind in ("apt_install", "pip_install"):
        packages = _strings(step["packages"], "packages")
        for package in packages:
            if not _PACKAGE.match(package) or package.startswith("-"):
                raise InvalidRequest(f"{package!r} is not a package name or requirement")
    elif kind == "run_commands":
        for command in _strings(step["commands"], "commands"):
            if "\0" in command:
                raise InvalidRequest("commands must not contain NUL bytes")
    elif kind == "env":
        if not step["env"]:
            raise InvalidRequest("env needs at least one variable")
        check_env(step["env"])
    elif kind == "workdir":
        check_sandbox_path(step["path"], "workdir")
    else:
        _check_digest(step["blob"])
        check_sandbox_path(step["dst"], "dst")
    return dict(step)


def _strings(values: Any, what: str) -> list[str]:
    if (
        not isinstance(values, list)
        or not values
        or len(values) > MAX_ARGS
        or not all(isinstance(v, str) and v.strip() for v in values)
    ):
        raise InvalidRequest(f"{what} must be a non-empty list of non-empty strings")
    return values


def _check_digest(value: Any) -> None:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise InvalidRequest(f"{value!r} is not a content digest like sha256:<64 hex digits>")


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
