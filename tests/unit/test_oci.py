"""OCI archives and layers built here with tarfile: reading, unpacking, overlay stacking, hostile input."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.core.errors import Conflict, InvalidRequest
from corral.images.oci import (
    Budget,
    OciImage,
    machine_platform,
    read_archive,
    unpack_layer,
)
from corral.images.oci import archive as archive_module
from corral.images.oci import unpack as unpack_module
from corral.images.oci.registry import _parse_reference

MTIME = 1_600_000_000
OTHER_PLATFORM = {"os": "linux", "architecture": "s390x"}


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "unpacking layers makes device nodes, chowns and sets trusted.* xattrs: root only"
        )


# -- building layers and archives ------------------------------------------------------------------


@dataclass
class Entry:
    """One tar member to write: `kind` is a tarfile type, `data` the content of a file."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    mtime: int = MTIME


def file(name: str, data: bytes = b"", **kw: int) -> Entry:
    return Entry(name, tarfile.REGTYPE, data, **kw)


def directory(name: str, mode: int = 0o755, **kw: int) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode, **kw)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.SYMTYPE, mode=0o777, link=target)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, link=target)


def tar_bytes(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type, info.mode, info.uid, info.gid = entry.kind, entry.mode, entry.uid, entry.gid
            info.linkname, info.mtime, info.size = entry.link, entry.mtime, len(entry.data)
            if entry.kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == tarfile.REGTYPE else None)
    return out.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# Three layers: a base, one that whites out and opaques parts of it, one gzip'd on top.
BASE = [
    directory("etc"),
    file("etc/motd", b"base\n"),
    file("etc/gone", b"whited out above\n"),
    directory("opt"),
    file("opt/old", b"hidden by the opaque dir above\n"),
    directory("home"),
    directory("home/u", mode=0o700, uid=1000, gid=1000),
    file("home/u/notes", b"mine\n", mode=0o600, uid=1000, gid=1000),
    directory("usr"),
    directory("usr/bin"),
    file("usr/bin/su", b"#!/bin/sh\n", mode=0o4755),
]
MIDDLE = [
    directory("etc"),
    file("etc/.wh.gone"),
    directory("opt"),
    file("opt/.wh..wh..opq"),
    file("opt/new", b"only this in /opt\n"),
    symlink("etc/motd.link", "motd"),
    file("usr/bin/tool", b"tool\n", mode=0o755),
    hardlink("usr/bin/tool-alias", "usr/bin/tool"),
    Entry("run/fifo", tarfile.FIFOTYPE, mode=0o620),
    Entry("dev/null", tarfile.CHRTYPE),
    file("var/lib/state", b"x"),
    directory("var/lib", mode=0o750),
    directory("var", mode=0o711, mtime=1_500_000_000),
    file("srv/sticky/.keep"),
    directory("srv/sticky", mode=0o1777),
    directory("srv/setgid", mode=0o2775, gid=50),
]
TOP = [directory("etc"), file("etc/motd", b"top\n")]
CONFIG = {
    "architecture": machine_platform()[1],
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "EMPTY="],
        "WorkingDir": "/srv",
        "User": "1000:1000",
        "Entrypoint": ["/usr/bin/tool"],
        "Cmd": ["--help"],
    },
}


def layer_blobs() -> list[bytes]:
    return [tar_bytes(BASE), tar_bytes(MIDDLE), gzip.compress(tar_bytes(TOP), mtime=0)]


def config_bytes(blobs: list[bytes], **settings: object) -> bytes:
    diff_ids = [sha(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b) for b in blobs]
    config = {**CONFIG, "config": {**CONFIG["config"], **settings}}  # type: ignore[dict-item]
    return json.dumps({**config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def archive(files: dict[str, bytes], *, compress: bool = False) -> bytes:
    data = tar_bytes([file(name, content) for name, content in files.items()])
    return gzip.compress(data) if compress else data


def docker_save(blobs: list[bytes]) -> dict[str, bytes]:
    """The legacy `docker save` layout: <id>/layer.tar, <config digest>.json, manifest.json."""
    config = config_bytes(blobs)
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    layer_names = [f"{i:064x}/layer.tar" for i in range(len(blobs))]
    manifest = [{"Config": config_name, "RepoTags": ["test:1"], "Layers": layer_names}]
    return {
        "manifest.json": json.dumps(manifest).encode(),
        config_name: config,
        **dict(zip(layer_names, blobs, strict=True)),
    }


def descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


def oci_manifest(blobs: list[bytes], config: bytes) -> bytes:
    layers = [
        descriptor(
            "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if blob[:2] == b"\x1f\x8b" else ""),
            blob,
        )
        for blob in blobs
    ]
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": layers,
        }
    ).encode()


def oci_index(entries: list[dict[str, object]]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
    ).encode()


def oci_layout(blobs: list[bytes]) -> dict[str, bytes]:
    """An OCI layout whose index.json points to an image index of two platforms (ours and s390x)."""
    ours_config = config_bytes(blobs, Env=["PLATFORM=ours"])
    other_blobs = [tar_bytes([file("other")])]
    other_config = config_bytes(other_blobs, Env=["PLATFORM=other"])
    ours, other = oci_manifest(blobs, ours_config), oci_manifest(other_blobs, other_config)
    manifest_type = "application/vnd.oci.image.manifest.v1+json"
    os_name, architecture = machine_platform()
    inner = oci_index(
        [
            descriptor(manifest_type, other, platform=OTHER_PLATFORM),
            descriptor(manifest_type, ours, platform={"os": os_name, "architecture": architecture}),
        ]
    )
    outer = oci_index([descriptor("application/vnd.oci.image.index.v1+json", inner)])
    contents = [*blobs, ours_config, *other_blobs, other_config, ours, other, inner]
    return {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": outer,
        **{f"blobs/sha256/{sha(c)[7:]}": c for c in contents},
    }


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- reading archives ------------------------------------------------------------------------------


def check_image(image: OciImage, blobs: list[bytes], workdir: Path) -> None:
    assert image.digests == tuple(sha(blob) for blob in blobs)
    assert [path.read_bytes() for path in image.layers] == blobs
    assert all(path.parent == workdir for path in image.layers)
    assert sorted(os.listdir(workdir)) == sorted(p.name for p in image.layers)


def test_read_docker_save_archive(tmp_path: Path) -> None:
    blobs = [*layer_blobs()[:2], tar_bytes(TOP)]  # docker save layers are uncompressed
    path = write(tmp_path, "image.tar", archive(docker_save(blobs)))
    (workdir := tmp_path / "work").mkdir()
    image = read_archive(path, workdir)
    check_image(image, blobs, workdir)
    assert image.config.env == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "EMPTY": ""}
    assert image.config.workdir == "/srv"
    assert image.config.user == "1000:1000"
    assert image.config.cmd == ("/usr/bin/tool", "--help")


def test_docker_save_layer_stored_twice_as_symlink(tmp_path: Path) -> None:
    blob = tar_bytes(BASE)
    files = docker_save([blob, blob])
    del files[f"{1:064x}/layer.tar"]
    entries = [file(name, content) for name, content in files.items()]
    entries.append(symlink(f"{1:064x}/layer.tar", f"../{0:064x}/layer.tar"))
    path = write(tmp_path, "image.tar", tar_bytes(entries))
    (workdir := tmp_path / "work").mkdir()
    image = read_archive(path, workdir)
    assert image.layers[0] == image.layers[1] and image.digests == (sha(blob), sha(blob))


def test_read_gzipped_oci_layout_with_nested_index_picks_this_platform(tmp_path: Path) -> None:
    blobs = layer_blobs()
    path = write(tmp_path, "image.tar.gz", archive(oci_layout(blobs), compress=True))
    (workdir := tmp_path / "work").mkdir()
    image = read_archive(path, workdir)
    check_image(image, blobs, workdir)
    assert image.config.env == {"PLATFORM": "ours"}
    assert image.config.cmd == ("/usr/bin/tool", "--help")


def test_config_without_settings(tmp_path: Path) -> None:
    blobs = [tar_bytes(TOP)]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(blobs[0])]}}).encode()
    manifest = oci_manifest(blobs, config)
    files = {
        "index.json": oci_index(
            [descriptor("application/vnd.oci.image.manifest.v1+json", manifest)]
        ),
        **{f"blobs/sha256/{sha(c)[7:]}": c for c in [*blobs, config, manifest]},
    }
    (workdir := tmp_path / "work").mkdir()
    image = read_archive(write(tmp_path, "image.tar", archive(files)), workdir)
    assert image.config.env == {}
    assert image.config.workdir is image.config.user is image.config.cmd is None


def test_index_for_another_platform_only_is_refused(tmp_path: Path) -> None:
    blobs = [tar_bytes(TOP)]
    config = config_bytes(blobs)
    manifest = oci_manifest(blobs, config)
    index = oci_index(
        [
            descriptor(
                "application/vnd.oci.image.manifest.v1+json", manifest, platform=OTHER_PLATFORM
            )
        ]
    )
    files = {
        "index.json": index,
        **{f"blobs/sha256/{sha(c)[7:]}": c for c in [*blobs, config, manifest]},
    }
    (workdir := tmp_path / "work").mkdir()
    with pytest.raises(InvalidRequest, match="linux/s390x") as caught:
        read_archive(write(tmp_path, "image.tar", archive(files)), workdir)
    assert caught.value.code == "invalid_oci_archive"


def broken_archives() -> dict[str, bytes]:
    blobs = layer_blobs()
    layout = oci_layout(blobs)
    good = archive(layout)
    missing = dict(layout)
    del missing[f"blobs/sha256/{sha(blobs[1])[7:]}"]
    tampered = dict(layout)
    tampered[f"blobs/sha256/{sha(blobs[1])[7:]}"] = blobs[1].replace(b"only this", b"ONLY THIS")
    saved = docker_save([tar_bytes(BASE)])
    saved_tampered = {
        k: (v + b"\0" * 512 if k.endswith("layer.tar") else v) for k, v in saved.items()
    }
    return {
        "not a tar": os.urandom(4096),
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "truncated gzip": gzip.compress(good)[:-100],
        "no index": archive({"hello": b"world"}),
        "index not json": archive({"index.json": b"{nope"}),
        "missing blob": archive(missing),
        "digest mismatch": archive(tampered),
        "docker save digest mismatch": archive(saved_tampered),
    }


@pytest.mark.parametrize("case", list(broken_archives()))
def test_malformed_archive_is_refused_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    path = write(tmp_path, "image.tar", broken_archives()[case])
    (workdir := tmp_path / "work").mkdir()
    with pytest.raises(InvalidRequest) as caught:
        read_archive(path, workdir)
    assert caught.value.code == "invalid_oci_archive"
    assert "docker save" in caught.value.message  # says what to do
    assert os.listdir(workdir) == []


def test_missing_archive_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="check the path"):
        read_archive(tmp_path / "absent.tar", tmp_path)


# -- unpacking layers ------------------------------------------------------------------------------


@pytest.fixture
def unpacked(root_only: None, tmp_path: Path) -> list[Path]:
    """The three layers of `layer_blobs`, unpacked side by side, bottom first."""
    dests = []
    for i, blob in enumerate(layer_blobs()):
        dest = tmp_path / f"layer-{i}"
        unpack_layer(write(tmp_path, f"blob-{i}", blob), dest)
        dests.append(dest)
    return dests


def test_unpack_makes_overlay_whiteouts_and_opaque_dirs(unpacked: list[Path]) -> None:
    middle = unpacked[1]
    gone = os.lstat(middle / "etc/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert os.getxattr(middle / "opt", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(middle / "opt")) == ["new"]  # no marker file left
    assert not list(middle.rglob(".wh.*"))
    with pytest.raises(OSError):
        os.getxattr(middle / "etc", "trusted.overlay.opaque")


def test_unpack_keeps_owners_modes_links_and_times(unpacked: list[Path]) -> None:
    base, middle, top = unpacked
    notes = os.lstat(base / "home/u/notes")
    assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (1000, 1000, 0o600)
    home = os.lstat(base / "home/u")
    assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (1000, 0o700)
    assert stat.S_IMODE(os.lstat(base / "usr/bin/su").st_mode) == 0o4755
    assert os.lstat(base / "etc/motd").st_mtime == MTIME
    assert os.readlink(middle / "etc/motd.link") == "motd"
    tool, alias = os.lstat(middle / "usr/bin/tool"), os.lstat(middle / "usr/bin/tool-alias")
    assert tool.st_ino == alias.st_ino and tool.st_nlink == 2
    fifo = os.lstat(middle / "run/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620
    assert not (middle / "dev/null").exists()  # devices are skipped
    # Directories listed after their children still get their own metadata.
    var = os.lstat(middle / "var")
    assert (stat.S_IMODE(var.st_mode), var.st_mtime) == (0o711, 1_500_000_000)
    assert stat.S_IMODE(os.lstat(middle / "var/lib").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(middle / "srv/sticky").st_mode) == 0o1777
    setgid = os.lstat(middle / "srv/setgid")
    assert (stat.S_IMODE(setgid.st_mode), setgid.st_gid) == (0o2775, 50)
    # A directory the layer never lists gets Docker's default.
    assert stat.S_IMODE(os.lstat(middle / "run").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(middle).st_mode) == 0o755
    assert (top / "etc/motd").read_bytes() == b"top\n"  # the gzip'd layer


def test_unpack_leaves_no_temporary_siblings(unpacked: list[Path]) -> None:
    assert sorted(p.name for p in unpacked[0].parent.iterdir() if p.is_dir()) == [
        "layer-0",
        "layer-1",
        "layer-2",
    ]


@contextlib.contextmanager
def overlay(lower: list[Path], target: Path) -> Iterator[Path]:
    target.mkdir()
    option = "lowerdir=" + ":".join(str(p) for p in reversed(lower))  # topmost first
    try:
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", option, str(target)],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount overlayfs here: {exc.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_layers_stack_in_a_real_overlay(unpacked: list[Path], tmp_path: Path) -> None:
    with overlay(unpacked, tmp_path / "merged") as merged:
        assert not (merged / "etc/gone").exists()  # whited out
        assert sorted(os.listdir(merged / "opt")) == ["new"]  # opaque: opt/old hidden
        assert (merged / "etc/motd").read_bytes() == b"top\n"
        assert (merged / "etc/motd.link").read_bytes() == b"top\n"
        assert (merged / "home/u/notes").read_bytes() == b"mine\n"
        assert os.lstat(merged / "home/u/notes").st_uid == 1000
        assert stat.S_IMODE(os.lstat(merged / "usr/bin/su").st_mode) == 0o4755
        assert (merged / "usr/bin/tool").is_file()


@pytest.mark.usefixtures("root_only")
def test_later_member_replaces_earlier(tmp_path: Path) -> None:
    blob = tar_bytes(
        [
            directory("d"),
            file("d/child"),
            file("d", b"now a file"),  # replaces the directory and its child
            file("f", b"one"),
            symlink("f", "elsewhere"),
            file("g/.wh.x"),
            file("g/x", b"x"),  # the last entry wins over the whiteout too
        ]
    )
    unpack_layer(write(tmp_path, "blob", blob), tmp_path / "out")
    assert (tmp_path / "out/d").read_bytes() == b"now a file"
    assert os.readlink(tmp_path / "out/f") == "elsewhere"
    assert (tmp_path / "out/g/x").read_bytes() == b"x"


def test_unpack_refuses_existing_dest(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(Conflict):
        unpack_layer(write(tmp_path, "blob", tar_bytes(TOP)), tmp_path / "out")


# -- hostile and broken layers ---------------------------------------------------------------------


@pytest.fixture
def sentinel(root_only: None, tmp_path: Path) -> Path:
    """A host directory outside every layer that no layer may change."""
    path = tmp_path / "host"
    path.mkdir()
    (path / "passwd").write_bytes(b"root:x:0:0\n")
    (path / "x").write_bytes(b"keep\n")
    return path


def host_state(path: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        p.name: (p.stat().st_nlink, stat.S_IMODE(p.stat().st_mode), p.read_bytes())
        for p in path.iterdir()
    }


def hostile_layers(sentinel: Path) -> dict[str, list[Entry]]:
    return {
        "write through symlink": [symlink("a", str(sentinel)), file("a/passwd", b"pwned")],
        "write through relative symlink": [
            symlink("a", "../../host"),
            file("a/passwd", b"pwned"),
        ],
        "whiteout through symlink": [symlink("a", str(sentinel)), file("a/.wh.x")],
        "opaque through symlink": [symlink("a", str(sentinel)), file("a/.wh..wh..opq")],
        "hardlink through symlink": [symlink("a", str(sentinel)), hardlink("b", "a/passwd")],
        "dir through symlink": [symlink("a", str(sentinel)), directory("a/sub")],
        "dot-dot name": [file("../host/passwd", b"pwned")],
        "nested dot-dot name": [directory("d"), file("d/../../host/x", b"pwned")],
        "hardlink with dot-dot": [hardlink("b", "../host/passwd")],
        "hardlink to absolute outside": [hardlink("b", str(sentinel / "passwd"))],
        "hardlink to a directory": [directory("d"), hardlink("b", "d")],
        "file under a file": [file("f"), file("f/x")],
    }


@pytest.mark.parametrize("case", list(hostile_layers(Path("/"))))
def test_hostile_layer_is_refused_and_host_untouched(
    tmp_path: Path, sentinel: Path, case: str
) -> None:
    before = host_state(sentinel)
    blob = write(tmp_path, "blob", tar_bytes(hostile_layers(sentinel)[case]))
    (tmp_path / "layers").mkdir()
    with pytest.raises(InvalidRequest) as caught:
        unpack_layer(blob, tmp_path / "layers/out")
    assert caught.value.code == "invalid_oci_archive"
    assert host_state(sentinel) == before
    assert os.listdir(tmp_path / "layers") == []
    with pytest.raises(OSError):
        os.getxattr(sentinel, "trusted.overlay.opaque")


def test_absolute_names_stay_inside_the_layer(tmp_path: Path, sentinel: Path) -> None:
    before = host_state(sentinel)
    blob = write(tmp_path, "blob", tar_bytes([file(str(sentinel / "passwd"), b"inside")]))
    unpack_layer(blob, tmp_path / "out")
    inside = tmp_path / "out" / str(sentinel / "passwd").lstrip("/")
    assert inside.read_bytes() == b"inside"
    assert host_state(sentinel) == before


def test_symlinks_to_outside_are_kept_but_never_followed(tmp_path: Path, sentinel: Path) -> None:
    blob = write(tmp_path, "blob", tar_bytes([symlink("etc", str(sentinel)), file("etc2/x")]))
    unpack_layer(blob, tmp_path / "out")
    assert os.readlink(tmp_path / "out/etc") == str(sentinel)


def broken_layers() -> dict[str, bytes]:
    good = tar_bytes([file("big", os.urandom(64 * 1024))])
    return {
        "not a tar": b"\x00garbage" * 100,
        "truncated": good[: len(good) // 2],
        "truncated gzip": gzip.compress(good)[: len(good) // 2],
    }


@pytest.mark.usefixtures("root_only")
@pytest.mark.parametrize("case", list(broken_layers()))
def test_broken_layer_leaves_no_partial_output(tmp_path: Path, case: str) -> None:
    blob = write(tmp_path, "blob", broken_layers()[case])
    (tmp_path / "layers").mkdir()
    with pytest.raises(InvalidRequest) as caught:
        unpack_layer(blob, tmp_path / "layers/out")
    assert caught.value.code == "invalid_oci_archive"
    assert os.listdir(tmp_path / "layers") == []


def test_zstd_layer_is_refused_by_name(tmp_path: Path) -> None:
    blob = write(tmp_path, "blob", b"\x28\xb5\x2f\xfd" + b"\0" * 64)
    with pytest.raises(InvalidRequest, match="zstd") as caught:
        unpack_layer(blob, tmp_path / "out")
    assert caught.value.code == "unsupported_layer_compression"
    assert not (tmp_path / "out").exists()


# -- image references ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "url", "name"),
    [
        ("debian", "https://registry-1.docker.io/v2/library/debian/", "latest"),
        (
            "docker.io/library/debian:bookworm",
            "https://registry-1.docker.io/v2/library/debian/",
            "bookworm",
        ),
        ("user/app:1.0", "https://registry-1.docker.io/v2/user/app/", "1.0"),
        ("localhost:5000/tools/python:3.12", "http://localhost:5000/v2/tools/python/", "3.12"),
        ("localhost/x", "http://localhost/v2/x/", "latest"),
        ("127.0.0.1:5000/a/b/c", "http://127.0.0.1:5000/v2/a/b/c/", "latest"),
        ("[::1]:5000/x:y", "http://[::1]:5000/v2/x/", "y"),
        (
            "registry.example/x@sha256:" + "a" * 64,
            "https://registry.example/v2/x/",
            "sha256:" + "a" * 64,
        ),
        (
            "registry.example:443/x:t@sha256:" + "b" * 64,
            "https://registry.example:443/v2/x/",
            "sha256:" + "b" * 64,
        ),
        ("insecure.example:8080/x", "http://insecure.example:8080/v2/x/", "latest"),
        ("plain.example/x", "http://plain.example/v2/x/", "latest"),
    ],
)
def test_references_resolve_like_docker(
    reference: str, url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_INSECURE_REGISTRIES", "insecure.example:8080, plain.example")
    parsed = _parse_reference(reference)
    assert (parsed.base_url, parsed.name) == (url, name)


@pytest.mark.parametrize(
    "reference",
    ["", "UPPER/case", "x:", "x@sha256:short", "x@md5:" + "a" * 32, "a//b", "x:t:u", "host:port/x"],
)
def test_malformed_references_are_refused(reference: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _parse_reference(reference)
    assert caught.value.code == "invalid_image_reference"


# -- unbounded unpacking -------------------------------------------------------------------------


def _header_only(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A member header declaring `size` bytes, and none of them: what a bomb looks like."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _gnu_sparse() -> bytes:
    """An old-style GNU sparse member ('S'), with a real size far above what it holds."""
    raw = bytearray(tar_bytes([file("f", b"x" * 512)]))
    raw[156:157] = tarfile.GNUTYPE_SPARSE
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    return bytes(raw)


def _pax_sparse() -> bytes:
    """A PAX (GNU 0.1) sparse member: its map declares 10 GB of holes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = 512
        info.pax_headers = {
            "GNU.sparse.numblocks": "1",
            "GNU.sparse.offset": "10000000000",
            "GNU.sparse.numbytes": "512",
            "GNU.sparse.map": "10000000000,512",
            "GNU.sparse.size": "10000000512",
        }
        tar.addfile(info, io.BytesIO(b"x" * 512))
    return out.getvalue()


def _huge_pax_header() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tar.addfile(info, io.BytesIO(b""))
    return out.getvalue()


def bombs() -> dict[str, tuple[bytes, str]]:
    many = tar_bytes([file(f"f{i}") for i in range(150)])
    zeros = tar_bytes([file("zeros", b"\0" * (3 << 20))])
    return {
        "gnu sparse": (_gnu_sparse(), "sparse"),
        "pax sparse": (_pax_sparse(), "sparse"),
        "huge declared size": (_header_only("big", 20 << 30), "more than 16 GiB"),
        "huge declared size of a device": (
            _header_only("dev", 20 << 30, tarfile.CHRTYPE),
            "more than 16 GiB",
        ),
        "huge extended header": (_huge_pax_header(), "extended header"),
        "many entries": (many, "more than 100 entries"),
        "gzip bomb": (gzip.compress(zeros), "more than 0.00195312 GiB"),
    }


@pytest.mark.usefixtures("root_only")
@pytest.mark.parametrize("case", list(bombs()))
def test_layers_that_unpack_without_bound_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.setattr(unpack_module, "MAX_MEMBERS", 100)
    monkeypatch.setattr(
        unpack_module, "MAX_LAYER_BYTES", 2 << 20 if case == "gzip bomb" else 16 << 30
    )
    data, reason = bombs()[case]
    blob = write(tmp_path, "blob", data)
    (tmp_path / "layers").mkdir()
    with pytest.raises(InvalidRequest, match=reason) as caught:
        unpack_layer(blob, tmp_path / "layers/out")
    assert caught.value.code == "invalid_oci_archive"
    assert os.listdir(tmp_path / "layers") == []


@pytest.mark.usefixtures("root_only")
def test_an_image_budget_spans_its_layers(tmp_path: Path) -> None:
    budget = Budget(3 << 20, what="the image")
    layer = write(tmp_path, "blob", tar_bytes([file("data", os.urandom(2 << 20))]))
    unpack_layer(layer, tmp_path / "one", budget)
    with pytest.raises(InvalidRequest, match="the image unpacks to more than"):
        unpack_layer(layer, tmp_path / "two", budget)
    assert not (tmp_path / "two").exists()


def test_an_archive_of_countless_entries_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive_module, "MAX_ARCHIVE_MEMBERS", 50)
    blob = write(tmp_path, "image.tar", tar_bytes([file(f"f{i}") for i in range(80)]))
    (tmp_path / "work").mkdir()
    with pytest.raises(InvalidRequest, match="more than 50 entries"):
        read_archive(blob, tmp_path / "work")
