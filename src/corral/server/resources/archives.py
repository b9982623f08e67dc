"""What a cluster's front copies between nodes as archives (snapshots, built images): the
temporary files they pass through on a node, and the SHA-256 every archive must name."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

from corral.core.errors import InvalidRequest
from corral.server.tenancy import Tenant

DIGEST_HEADER = "X-Corral-Digest"
IMAGE_HEADER = "X-Corral-Image"  # with a snapshot's archive: the image it starts from
T = TypeVar("T")


class Archives:
    """Archives packed for, and received from, the front (its key only)."""

    def __init__(self, tenant: Tenant) -> None:
        # In the node's own snapshot directory, swept at every start.
        self._temp = tenant.service.engine.snapshots.root / ".tmp-archives"

    def _new_archive(self) -> Path:
        self._temp.mkdir(mode=0o700, exist_ok=True)
        handle, name = tempfile.mkstemp(suffix=".tar", dir=self._temp)
        os.close(handle)  # mkstemp made it 0600
        return Path(name)

    async def _packed(self, pack: Callable[[Path], str]) -> tuple[Path, str]:
        """An archive `pack` writes (the caller deletes it), and the SHA-256 it returns."""
        archive = self._new_archive()
        try:
            return archive, await asyncio.to_thread(pack, archive)
        except BaseException:
            archive.unlink(missing_ok=True)
            raise

    async def _received(
        self, chunks: AsyncIterator[bytes], digest: str | None, install: Callable[[Path, str], T]
    ) -> T:
        """What `install` makes of the archive in `chunks`, which it checks is `digest`."""
        if not digest or not digest.startswith("sha256:"):
            raise InvalidRequest(
                f"send the archive's SHA-256 in the {DIGEST_HEADER} header (sha256:<hex>)",
                code="digest_required",
            )
        archive = self._new_archive()
        try:
            with archive.open("wb") as out:
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)
            return await asyncio.to_thread(install, archive, digest)
        finally:
            archive.unlink(missing_ok=True)
