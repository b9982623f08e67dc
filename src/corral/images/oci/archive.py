"""Images in archives on disk: `docker save` tarballs and OCI image layouts."""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal

from corral.core.errors import InvalidRequest
from corral.images.oci.manifest import (
    _CHUNK,
    _JSON_LIMIT,
    _MAX_LINK_HOPS,
    _MIB,
    _NAMED_BY_DIGEST,
    OciImage,
    _descriptors,
    _digest_of,
    _Json,
    _load_json,
    _Malformed,
    _parse_config,
    _parse_json,
    _removing_new_entries,
    _resolve,
    _size_of,
    _store_blob,
    _strings,
)

MAX_HEADER_BYTES = 1 << 20  # a long name or a PAX extended header, which tarfile reads whole
MAX_ARCHIVE_MEMBERS = 10_000  # an image archive holds a few blobs and JSON files
_ARCHIVE_READ_ERRORS = (_Malformed, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def read_archive(path: Path, workdir: Path) -> OciImage:
    """The image in a `docker save` or OCI image-layout tarball (optionally gzip-compressed).

    The layer blobs it uses are copied into `workdir` (an existing, empty directory), each
    verified against the sha256 the archive names for it. An index listing several platforms
    yields this machine's image.

    Raises:
        InvalidRequest: code ``invalid_oci_archive`` for anything malformed, truncated, missing
            or failing its digest; `workdir` is then left as it was.

    Example:
        >>> image = read_archive(Path("python.tar.gz"), Path("/var/tmp/im-1"))  # doctest: +SKIP
        >>> image.config.cmd  # doctest: +SKIP
        ('python3',)
    """
    try:
        source = path.open("rb")
    except OSError as exc:
        raise InvalidRequest(
            f"cannot read image archive {path}: {exc.strerror}; check the path",
            code="invalid_oci_archive",
        ) from exc
    with source, _removing_new_entries(workdir):
        try:
            with _open_tar(source, "r:*") as tar:
                return _Archive(tar, workdir).image()
        except _ARCHIVE_READ_ERRORS as exc:
            raise InvalidRequest(
                f"{path} is not a valid image archive: {exc}. Export the image again with "
                "`docker save IMAGE -o FILE` or `skopeo copy docker://IMAGE oci-archive:FILE`",
                code="invalid_oci_archive",
            ) from exc


class _Header(tarfile.TarInfo):
    """tarfile's header parsing, minus what a hostile layer could use against the host: an
    extended header or long name is read whole into memory, and a sparse member expands to
    its declared size on disk however little the layer holds."""

    _EXTENDED = (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
    )

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self._EXTENDED and self.size > MAX_HEADER_BYTES:
            raise _Malformed(f"an extended header of {self.size:,} bytes (at most 1 MiB)")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Malformed(f"member {self.name!r} is a sparse file, which layers may not hold")
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


def _open_tar(source: IO[bytes], mode: Literal["r:*", "r|*"]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=source, mode=mode, tarinfo=_Header)
    except tarfile.ReadError as exc:  # its message lists every compression tried
        raise _Malformed("it is not a tar file, plain or compressed") from exc


class _Archive:
    """The members of one image archive, looked up by normalised name, never written by name."""

    def __init__(self, tar: tarfile.TarFile, workdir: Path) -> None:
        self._tar = tar
        self._workdir = workdir
        self._members: dict[str, tarfile.TarInfo] = {}
        for count, member in enumerate(tar, 1):
            if count > MAX_ARCHIVE_MEMBERS:
                raise _Malformed(f"it has more than {MAX_ARCHIVE_MEMBERS:,} entries")
            self._members[_archive_name(member.name)] = member

    def image(self) -> OciImage:
        if "index.json" in self._members:  # OCI layout, also written by Docker 25 and later
            return self._layout_image()
        if "manifest.json" in self._members:
            return self._docker_save_image()
        raise _Malformed("it has neither index.json (OCI layout) nor manifest.json (docker save)")

    def _layout_image(self) -> OciImage:
        index = _parse_json(self._read("index.json"), "index.json")
        manifest = _resolve(index, self._json_blob)
        config = _parse_config(self._json_blob(manifest["config"]))
        descriptors = _descriptors(manifest, "layers")
        digests = tuple(_digest_of(layer) for layer in descriptors)
        sizes = [_size_of(layer) for layer in descriptors]
        names = [_blob_name(digest) for digest in digests]
        return OciImage(self._copy_all(names, digests, sizes), digests, config)

    def _docker_save_image(self) -> OciImage:
        # One image per archive: `docker save a b` lists several and the first one is taken.
        entries = _load_json(self._read("manifest.json"), "manifest.json")
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
            raise _Malformed("manifest.json lists no image")
        entry = entries[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str):
            raise _Malformed("manifest.json names no config")
        config_bytes = self._read(config_name)
        named = _named_digest(config_name)
        if named and f"sha256:{hashlib.sha256(config_bytes).hexdigest()}" != named:
            raise _Malformed(f"config {config_name} does not match its digest")
        config_doc = _parse_json(config_bytes, config_name)
        # The layers of `docker save` are uncompressed, so their digests are the config's diff_ids.
        diff_ids = _strings((config_doc.get("rootfs") or {}).get("diff_ids"), "rootfs.diff_ids")
        names = _strings(layer_names, "Layers of manifest.json")
        if len(names) != len(diff_ids):
            raise _Malformed(f"manifest.json lists {len(names)} layers, the config {len(diff_ids)}")
        digests = tuple(
            _digest_of({"digest": _named_digest(name) or diff_id})
            for name, diff_id in zip(names, diff_ids, strict=True)
        )
        layers = self._copy_all(names, digests, [None] * len(names))
        return OciImage(layers, digests, _parse_config(config_doc))

    def _json_blob(self, descriptor: _Json) -> _Json:
        digest = _digest_of(descriptor)
        data = self._read(_blob_name(digest))
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise _Malformed(f"blob {digest} does not match its digest")
        return _parse_json(data, f"blob {digest}")

    def _copy_all(
        self, names: Sequence[str], digests: Sequence[str], sizes: Sequence[int | None]
    ) -> tuple[Path, ...]:
        """Copy blobs out in the order they lie in the archive, and return them in list order.

        A gzip'd archive cannot seek backwards without decompressing again from its start.
        """
        blobs = list(zip(names, digests, sizes, strict=True))
        order = sorted(range(len(blobs)), key=lambda i: self._file(names[i]).offset_data)
        copied = {i: self._copy(*blobs[i]) for i in order}
        return tuple(copied[i] for i in range(len(blobs)))

    def _copy(self, name: str, digest: str, size: int | None) -> Path:
        member = self._file(name)
        if size is not None and member.size != size:
            raise _Malformed(f"{name} has {member.size} bytes, its descriptor says {size}")
        source = self._tar.extractfile(member)
        assert source is not None  # _file returns regular files only
        with source:
            return _store_blob(iter(lambda: source.read(_CHUNK), b""), self._workdir, digest, size)

    def _read(self, name: str) -> bytes:
        member = self._file(name)
        if member.size > _JSON_LIMIT:
            raise _Malformed(f"{name} is larger than {_JSON_LIMIT // _MIB} MiB")
        source = self._tar.extractfile(member)
        assert source is not None
        with source:
            return source.read()

    def _file(self, name: str) -> tarfile.TarInfo:
        """The regular file member called `name`, following links inside the archive only.

        `docker save` stores a layer used twice as a symlink to its first copy.
        """
        wanted = _archive_name(name)
        for _ in range(_MAX_LINK_HOPS):
            member = self._members.get(wanted)
            if member is None:
                raise _Malformed(f"it has no member {name!r} (missing blob)")
            if member.isreg():
                return member
            if member.issym():
                wanted = _archive_name(f"{os.path.dirname(wanted)}/{member.linkname}")
            elif member.islnk():
                wanted = _archive_name(member.linkname)
            else:
                raise _Malformed(f"member {name!r} is not a file")
        raise _Malformed(f"member {name!r} is a chain of more than {_MAX_LINK_HOPS} links")


def _archive_name(name: str) -> str:
    return os.path.normpath("/" + name).lstrip("/")


def _blob_name(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/", 1)


def _named_digest(name: str) -> str | None:
    found = _NAMED_BY_DIGEST.search(name)
    return f"sha256:{found.group(1)}" if found else None


# -- registries ------------------------------------------------------------------------------------
