"""Encryption at rest: what a sandbox leaves on the host's disk that holds its secrets.

Sealed are the memory images of hibernated sandboxes and snapshots (a sandbox's whole memory,
its secrets with it), and every persisted copy of a sandbox's environment and agent secret
(`sandbox.json`, `snapshot.json`, the server's database). Not sealed: the sandbox's disk and
volumes (files the sandbox writes; put the data directory on an encrypted filesystem for those),
built images, logs.

The cipher is AES-256-GCM from `cryptography`. Files are sealed in 1 MiB chunks, so neither end
holds a whole image in memory: each file gets a fresh random salt, its own key derived from the
master key with HKDF, and each chunk a nonce made of its counter and a last-chunk flag, so a
chunk cannot be dropped, repeated, reordered or cut off without decryption failing. Short
secrets are sealed whole, with a fresh nonce, and bound to what they are (`purpose`).

Keys: the key file holds one or more 256-bit keys, one hex line each. The first seals; any of
them opens (each sealed thing names its key by a short digest). To rotate, put a new key on the
first line and restart: new seals use it, old ones still open, and secrets are sealed again
with the new key as they are next written; delete the old line once nothing uses it
(`KeyRing.uses` says what still does). The file is made on first start (0600, root's) unless the
operator supplies one; a file that others may read is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from corral.core.errors import CorralError
from corral.core.spec import SandboxSpec

KEY_FILE = "at-rest.key"  # in the data directory, unless the operator keeps the key elsewhere
MAGIC = b"CORRAL-SEALED-1\n"  # the first bytes of a sealed file
TEXT_PREFIX = "sealed:1:"  # of a sealed short secret
KEY_BYTES = 32
KEY_ID_BYTES = 8
SALT_BYTES = 16
NONCE_END = KEY_ID_BYTES + 12  # in a sealed secret: its key's id, then its nonce
CHUNK = 1 << 20
TAG = 16
HEADER = struct.Struct(f">{len(MAGIC)}s{KEY_ID_BYTES}s{SALT_BYTES}s")


class SealError(CorralError):
    """Sealed data that cannot be opened: a wrong or missing key, or data changed on disk."""

    default_code = "sealed_data_unreadable"


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"corral at-rest key id" + key).digest()[:KEY_ID_BYTES]


class KeyRing:
    """The keys sealing data at rest: the first seals, any opens. Made from `keys`, or read
    from the key file at `path` when first needed (made there first if `create`)."""

    def __init__(
        self, keys: list[bytes] | None = None, *, path: Path | None = None, create: bool = False
    ) -> None:
        self._path, self._create = path, create
        self._keys: dict[bytes, bytes] = {}
        self._current = b""
        if keys is not None:
            self._take(keys)
        elif path is None:
            raise ValueError("a key ring needs keys or a key file")

    def _take(self, keys: list[bytes]) -> None:
        if not keys or any(len(key) != KEY_BYTES for key in keys):
            raise ValueError(f"a key ring needs keys of {KEY_BYTES} bytes")
        self._keys = {key_id(key): key for key in keys}
        self._current = key_id(keys[0])

    @property
    def current(self) -> bytes:
        """The id of the key that seals (reading the key file, the first time)."""
        if not self._current:
            assert self._path is not None
            self._take(_read_key_file(self._path, self._create))
        return self._current

    def check(self) -> None:
        """Read the key file now (making it if asked), so that a bad one is reported early."""
        _ = self.current

    @property
    def ids(self) -> list[bytes]:
        """The ids of every key, the sealing one first."""
        current = self.current
        return [current, *(ident for ident in self._keys if ident != current)]

    def _key(self, ident: bytes) -> bytes:
        if ident not in self.ids:
            raise SealError(
                f"data sealed with key {ident.hex()}, which is not in the key file: "
                "put the old key back (any line after the first)"
            )
        return self._keys[ident]

    # -- short secrets ---------------------------------------------------------------------

    def seal_text(self, plain: str, purpose: str) -> str:
        nonce = secrets.token_bytes(NONCE_END - KEY_ID_BYTES)
        sealed = AESGCM(self._key(self.current)).encrypt(nonce, plain.encode(), purpose.encode())
        blob = self.current + nonce + sealed
        return TEXT_PREFIX + base64.urlsafe_b64encode(blob).decode()

    def open_text(self, text: str, purpose: str) -> str:
        """The secret sealed in `text`; text that was never sealed (older data) as it is."""
        if not text.startswith(TEXT_PREFIX):
            return text
        try:
            blob = base64.urlsafe_b64decode(text[len(TEXT_PREFIX) :])
        except ValueError:
            raise SealError("a sealed secret is damaged") from None
        ident, nonce, sealed = blob[:KEY_ID_BYTES], blob[KEY_ID_BYTES:NONCE_END], blob[NONCE_END:]
        try:
            plain = AESGCM(self._key(ident)).decrypt(nonce, sealed, purpose.encode())
        except InvalidTag:
            raise SealError("a sealed secret is damaged or not what it claims") from None
        return plain.decode()

    # -- files -----------------------------------------------------------------------------

    def _file_key(self, ident: bytes, salt: bytes) -> AESGCM:
        derived = HKDF(hashes.SHA256(), KEY_BYTES, salt, b"corral sealed file").derive(
            self._key(ident)
        )
        return AESGCM(derived)

    def seal_file(self, source: BinaryIO, target: BinaryIO) -> None:
        """Write `source` (read to its end) to `target`, sealed."""
        salt = secrets.token_bytes(SALT_BYTES)
        header = HEADER.pack(MAGIC, self.current, salt)
        aead = self._file_key(self.current, salt)
        target.write(header)
        for index, chunk, last in _chunks(source, CHUNK):
            target.write(aead.encrypt(_nonce(index, last), chunk, header))

    def open_file(self, source: BinaryIO, target: BinaryIO) -> None:
        """Write the sealed `source` to `target` in the clear."""
        header = source.read(HEADER.size)
        if len(header) != HEADER.size or not header.startswith(MAGIC):
            raise SealError("a sealed file is not sealed, or is cut short")
        _, ident, salt = HEADER.unpack(header)
        aead = self._file_key(ident, salt)
        try:
            for index, chunk, last in _chunks(source, CHUNK + TAG):
                target.write(aead.decrypt(_nonce(index, last), chunk, header))
        except InvalidTag:
            raise SealError("a sealed file is damaged, cut short or not what it claims") from None

    def uses(self, path: Path) -> bytes | None:
        """The id of the key that sealed the file at `path`; None if it is not sealed."""
        with path.open("rb") as handle:
            header = handle.read(HEADER.size)
        if len(header) != HEADER.size or not header.startswith(MAGIC):
            return None
        return bytes(HEADER.unpack(header)[1])


def _read_key_file(path: Path, create: bool) -> list[bytes]:
    if create and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise CorralError(
            f"cannot read the at-rest key file {path}: {exc.strerror}", code="bad_key_file"
        ) from None
    with os.fdopen(fd) as handle:
        if os.fstat(handle.fileno()).st_mode & 0o077:
            raise CorralError(
                f"the at-rest key file {path} may be read by others: chmod 600 it",
                code="bad_key_file",
            )
        lines = [line.strip() for line in handle if line.strip()]
    try:
        keys = [bytes.fromhex(line) for line in lines]
        if not keys or any(len(key) != KEY_BYTES for key in keys):
            raise ValueError
    except ValueError:
        raise CorralError(
            f"the at-rest key file {path} must hold one or more keys of {KEY_BYTES} bytes, "
            "one per line in hex (make one with: openssl rand -hex 32)",
            code="bad_key_file",
        ) from None
    return keys


def seal_spec(keys: KeyRing, spec: SandboxSpec) -> dict[str, Any]:
    """`spec.to_dict()` with its environment sealed, to be written anywhere."""
    data = spec.to_dict()
    data["env"] = keys.seal_text(json.dumps(data["env"]), "env")
    return data


def open_spec(keys: KeyRing, data: Mapping[str, Any]) -> SandboxSpec:
    """The spec `seal_spec` wrote (or an older, unsealed one)."""
    env = data.get("env")
    if isinstance(env, str):
        data = {**data, "env": json.loads(keys.open_text(env, "env"))}
    return SandboxSpec.from_dict(data)


def seal_secret(keys: KeyRing, secret: bytes | None) -> str | None:
    return None if secret is None else keys.seal_text(secret.hex(), "agent_secret")


def open_secret(keys: KeyRing, sealed: str | None) -> bytes | None:
    return bytes.fromhex(keys.open_text(sealed, "agent_secret")) if sealed else None


def is_sealed(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _nonce(index: int, last: bool) -> bytes:
    return struct.pack(">QI", index, int(last))


def _chunks(source: BinaryIO, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """The chunks of `source`, each flagged if it is the last (an empty file is one empty
    chunk, so even it is authenticated)."""
    index = 0
    chunk = source.read(size)
    while True:
        following = source.read(size) if len(chunk) == size else b""
        yield index, chunk, not following
        if not following:
            return
        chunk, index = following, index + 1
