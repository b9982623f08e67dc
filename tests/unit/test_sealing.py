"""Encryption at rest: sealed files and secrets open only whole, unchanged and with their key."""

from __future__ import annotations

import io
import os
import secrets
import stat
from pathlib import Path

import pytest

from corral.core.errors import CorralError
from corral.engine.sealing import CHUNK, HEADER, KeyRing, SealError, is_sealed


def ring(*keys: bytes) -> KeyRing:
    return KeyRing(list(keys) or [secrets.token_bytes(32)])


def seal(keys: KeyRing, data: bytes) -> bytes:
    out = io.BytesIO()
    keys.seal_file(io.BytesIO(data), out)
    return out.getvalue()


def unseal(keys: KeyRing, sealed: bytes) -> bytes:
    out = io.BytesIO()
    keys.open_file(io.BytesIO(sealed), out)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_files_round_trip_and_hide_their_contents(size: int) -> None:
    keys = ring()
    data = (b"MARKER-" * (size // 7 + 1))[:size]
    sealed = seal(keys, data)
    assert unseal(keys, sealed) == data
    if size >= 7:
        assert b"MARKER-" not in sealed
    assert seal(keys, data) != sealed  # a fresh salt each time


def test_a_changed_cut_or_reordered_file_does_not_open() -> None:
    keys = ring()
    sealed = seal(keys, os.urandom(2 * CHUNK + 5))
    flipped = bytearray(sealed)
    flipped[HEADER.size + 100] ^= 1
    chunk = CHUNK + 16
    first, second = (
        sealed[HEADER.size : HEADER.size + chunk],
        sealed[HEADER.size + chunk : HEADER.size + 2 * chunk],
    )
    swapped = sealed[: HEADER.size] + second + first + sealed[HEADER.size + 2 * chunk :]
    for damaged in (
        bytes(flipped),
        sealed[: HEADER.size + 2 * chunk],  # the last chunk dropped: the new last is not "last"
        sealed[:-1],
        swapped,
        sealed[:10],
    ):
        with pytest.raises(SealError):
            unseal(keys, damaged)


def test_rotation_opens_old_data_and_seals_with_the_new_key() -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    before = seal(ring(old), b"old data")
    text = ring(old).seal_text("API_TOKEN=1", "env")
    rotated = ring(new, old)
    assert unseal(rotated, before) == b"old data"
    assert rotated.open_text(text, "env") == "API_TOKEN=1"
    assert unseal(ring(new), seal(rotated, b"new data")) == b"new data"
    with pytest.raises(SealError, match="not in the key file"):
        unseal(ring(new), before)


def test_secrets_are_bound_to_their_purpose_and_plain_text_passes() -> None:
    keys = ring()
    sealed = keys.seal_text("hunter2", "env")
    assert "hunter2" not in sealed
    assert keys.open_text(sealed, "env") == "hunter2"
    with pytest.raises(SealError):
        keys.open_text(sealed, "agent_secret")
    with pytest.raises(SealError):
        keys.open_text(sealed[:-4] + "AAAA", "env")
    assert keys.open_text("written before sealing", "env") == "written before sealing"


def test_the_key_file_is_made_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "at-rest.key"
    made = KeyRing(path=path, create=True)
    assert not path.exists()  # read (and made) when first needed
    assert made.current and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = KeyRing(path=path, create=True)
    assert again.current == made.current
    sealed_path = tmp_path / "image"
    with sealed_path.open("wb") as target:
        made.seal_file(io.BytesIO(b"x"), target)
    assert is_sealed(sealed_path) and made.uses(sealed_path) == made.current
    path.chmod(0o644)
    with pytest.raises(CorralError, match="chmod 600") as refused:
        KeyRing(path=path).check()
    assert refused.value.code == "bad_key_file"
    path.chmod(0o600)
    path.write_text("not hex\n")
    with pytest.raises(CorralError, match="openssl rand -hex 32"):
        KeyRing(path=path).check()
    with pytest.raises(CorralError, match="cannot read"):
        KeyRing(path=tmp_path / "missing").check()
