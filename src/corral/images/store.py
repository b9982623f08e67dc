"""Root filesystems for sandboxes: the built-in images and where their layers live.

- ``debian``: a minimal Debian bookworm root with python3 and pip, built once with mmdebstrap into
  the data directory (20 to 30 s, progress reported), then shared read-only by every sandbox.
- ``code-interpreter``: ``debian`` with IPython, numpy, pandas, matplotlib and Node.js, from
  Debian's packages, built the same way on first use (a minute or two): the code interpreter's.
- ``host``: an empty skeleton with the host's ``/usr`` bound read-only on top; starts instantly on
  any machine, with whatever the host has installed.

An image is a stack of read-only layers; sandboxes add their own writable layer on top and never
copy an image.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from corral.core.errors import ImageNotFound, InvalidRequest, SandboxFailed
from corral.core.names import BUILTIN_IMAGES
from corral.images.layers import LayerStore

StatusLine = Callable[[str], None]  # told each line of progress, as it happens

DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pip", "ca-certificates", "procps")
CODE_PACKAGES = ("ipython3", "python3-numpy", "python3-pandas", "python3-matplotlib", "nodejs")
# The images made with mmdebstrap, and their packages (without what they only recommend).
DEBOOTSTRAPPED = {"debian": DEBIAN_PACKAGES, "code-interpreter": DEBIAN_PACKAGES + CODE_PACKAGES}
# Documentation, manuals and translations are a third of a minimal root and no use to an agent.
DEBIAN_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

HOST_USR_SYMLINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
HOST_ETC_BINDS = ("ld.so.cache", "alternatives", "ssl", "ca-certificates", "localtime")


@dataclass(frozen=True)
class HostBind:
    """A host path bound read-only into every sandbox of an image."""

    source: Path
    target: str


@dataclass(frozen=True)
class RootImage:
    """A resolved image: read-only layers (topmost first), read-only host binds, defaults."""

    name: str
    layers: tuple[Path, ...]
    binds: tuple[HostBind, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None


class ImageStore:
    """The images of one data directory. Building is done once, under a file lock."""

    names = BUILTIN_IMAGES

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built = LayerStore(root)
        self._local: dict[str, Path] = {}

    def register(self, name: str, rootfs: Path) -> None:
        """Make a root filesystem directory on this machine available as image `name`."""
        if name in self.names or not name:
            raise InvalidRequest(f"image name {name!r} is taken or empty")
        if not rootfs.is_dir():
            raise InvalidRequest(f"{rootfs} is not a directory")
        self._local[name] = rootfs

    def is_builtin(self, name: str) -> bool:
        """Whether `name` is a built-in or registered image (not one built from a recipe)."""
        return name in self.names or name in self._local

    def resolve(self, name: str, progress: StatusLine | None = None) -> RootImage:
        """The image called `name`, built first if needed (which may take half a minute)."""
        if name in DEBOOTSTRAPPED:
            build = functools.partial(self._build_debian, name=name)
            return RootImage(name, (self._ensure(name, build, progress),))
        if name == "host":
            rootfs = self._ensure("host", self._build_host_skeleton, progress)
            return RootImage(name, (rootfs,), host_binds())
        if name in self._local:
            return RootImage(name, (self._local[name],))
        if name.startswith("im-"):
            return self._resolve_built(name, progress)
        known = ", ".join([*self.names, *sorted(self._local)])
        raise ImageNotFound(
            f"no image named {name!r}; available: {known}, or the id of a built image"
        )

    def _resolve_built(self, image_id: str, progress: StatusLine | None) -> RootImage:
        manifest = self.built.manifest(image_id)
        if manifest is None or not all(self.built.has_layer(k) for k in manifest.layers):
            raise ImageNotFound(f"no built image {image_id!r} (removed or pruned?); build it again")
        layers = tuple(self.built.layer(key) for key in reversed(manifest.layers))
        base = self.resolve(manifest.base, progress) if manifest.base else RootImage("", ())
        return RootImage(image_id, layers + base.layers, base.binds, manifest.env, manifest.workdir)

    def _ensure(
        self, name: str, build: Callable[[Path, StatusLine], None], progress: StatusLine | None
    ) -> Path:
        final = self.root / name / "rootfs"
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / f"{name}.lock"):
            if final.is_dir():  # someone else built it while we waited
                return final
            work = Path(tempfile.mkdtemp(prefix="rootfs.", dir=final.parent))
            work.chmod(0o755)  # apt downloads as the unprivileged _apt user
            try:
                build(work, progress or (lambda _line: None))
                work.chmod(0o755)
                work.rename(final)  # atomic: a half-built image is never visible
            finally:
                if work.exists():
                    shutil.rmtree(work, ignore_errors=True)
        return final

    def _build_debian(self, target: Path, progress: StatusLine, *, name: str) -> None:
        if shutil.which("mmdebstrap") is None:
            raise SandboxFailed(
                "mmdebstrap is not installed; run scripts/setup as root", code="missing_dependency"
            )
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=directory",
            "--include=" + ",".join(DEBOOTSTRAPPED[name]),
            *(f"--dpkgopt={rule}" for rule in DEBIAN_EXCLUDES),
            "--customize-hook=rm -rf $1/var/cache/apt/* $1/var/lib/apt/lists/*",
            DEBIAN_SUITE,
            str(target),
            *(str(p) for p in apt_sources(DEBIAN_SUITE)),
        ]
        progress(f"building the {name} image with mmdebstrap ({DEBIAN_SUITE})")
        tail: list[str] = []
        with subprocess.Popen(  # the context closes the pipe (unclosed, it warns at exit)
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
        ) as process:
            assert process.stderr is not None
            for line in process.stderr:
                line = line.rstrip()
                tail = [*tail[-19:], line]
                progress(line)
        if process.returncode != 0:
            raise SandboxFailed(
                f"building the {name} image failed:\n" + "\n".join(tail), code="image_build_failed"
            )

    def _build_host_skeleton(self, target: Path, progress: StatusLine) -> None:
        progress("preparing the host image skeleton")
        for name in (
            "usr",
            "etc",
            "root",
            "tmp",
            "home",
            "proc",
            "dev",
            "sys",
            "run",
            "var/tmp",
            "mnt",
            "opt",
            "srv",
        ):
            (target / name).mkdir(parents=True, exist_ok=True)
        (target / "root").chmod(0o700)
        (target / "tmp").chmod(0o1777)
        (target / "var/tmp").chmod(0o1777)
        for name in HOST_USR_SYMLINKS:
            host = Path("/") / name
            if host.is_symlink():
                (target / name).symlink_to(os.readlink(host))
            elif host.is_dir():
                (target / name).mkdir()
        etc = target / "etc"
        (etc / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            "user:x:1000:1000:user:/home/user:/bin/bash\n"
        )
        (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\nuser:x:1000:\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
        (etc / "resolv.conf").write_text("")
        (target / "home/user").mkdir()
        os.chown(target / "home/user", 1000, 1000)
        for name in HOST_ETC_BINDS:
            if (Path("/etc") / name).exists():
                path = etc / name
                if (Path("/etc") / name).is_dir():
                    path.mkdir()
                else:
                    path.touch()


def host_binds() -> tuple[HostBind, ...]:
    """What the host image binds from the host: /usr, unmerged top-level dirs, a few of /etc."""
    binds = [HostBind(Path("/usr"), "/usr")]
    for name in HOST_USR_SYMLINKS:
        host = Path("/") / name
        if host.is_dir() and not host.is_symlink():
            binds.append(HostBind(host, "/" + name))
    binds += [
        HostBind(Path("/etc") / n, "/etc/" + n)
        for n in HOST_ETC_BINDS
        if (Path("/etc") / n).exists()
    ]
    return tuple(binds)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_SUITES_LINE = re.compile(r"^Suites:(.*)$", re.MULTILINE)


def apt_sources(suite: str) -> list[Path]:
    """This machine's apt source files that serve `suite`, to build images from its own mirror.

    Corral never names a mirror itself; without a matching source file mmdebstrap uses its own
    default.
    """
    found: list[Path] = []
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if path.name.startswith("corral-") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            serves = any(suite in m.group(1).split() for m in _SUITES_LINE.finditer(text))
        elif path.suffix == ".list" or path.name == "sources.list":
            serves = any(
                line.split()[0] == "deb" and suite in line.split()
                for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            )
        else:
            serves = False
        if serves:
            found.append(path)
    return found
