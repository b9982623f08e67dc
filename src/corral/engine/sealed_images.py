"""Memory images sealed at rest (see `corral.engine.sealing`).

A checkpoint is written in the clear only into a private memory filesystem (a tmpfs mounted for
it, root's alone), sealed from there into the data directory file by file, and the clear copy
is dropped as each file is sealed; a restore opens the image into such a filesystem for the
runtime to read, and drops it once the sandbox runs. So a sandbox's memory never reaches the
disk in the clear, at the price of holding one clear copy of the image in memory for the
moment of the checkpoint or the restore. Images written before sealing existed are restored as
they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from corral.engine.sealing import KeyRing, is_sealed
from corral.host import mounts
from corral.runtimes import Runtime
from corral.runtimes.plan import SandboxPlan


class SealedImages:
    """Checkpoints and restores through `runtime`, sealing what reaches the disk."""

    def __init__(self, keys: KeyRing, staging: Path) -> None:
        self.keys = keys
        self.staging = staging  # where the private memory filesystems are mounted

    def clear_leftovers(self) -> None:
        """Drop what a crashed engine left staged."""
        mounts.remove_tree(self.staging)

    @contextlib.contextmanager
    def _in_memory(self) -> Iterator[Path]:
        self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=self.staging))
        try:
            mounts.private_tmpfs(path)
            yield path
        finally:
            mounts.remove_tree(path)

    def checkpoint(
        self, runtime: Runtime, plan: SandboxPlan, image_dir: Path, *, leave_running: bool = False
    ) -> None:
        """`runtime.checkpoint` into `image_dir`, sealed."""
        with self._in_memory() as clear:
            runtime.checkpoint(plan, clear, leave_running=leave_running)
            image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for source in sorted(clear.iterdir()):
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(image_dir / source.name, flags, 0o600)
                with source.open("rb") as plain, os.fdopen(fd, "wb") as sealed:
                    self.keys.seal_file(plain, sealed)
                source.unlink()  # its memory back at once

    def _open(self, image_dir: Path, clear: Path) -> None:
        for source in sorted(image_dir.iterdir()):
            if source.is_file() and is_sealed(source):
                with source.open("rb") as sealed, (clear / source.name).open("wb") as plain:
                    self.keys.open_file(sealed, plain)

    @contextlib.asynccontextmanager
    async def opened(self, image_dir: Path) -> AsyncIterator[Path]:
        """The image in `image_dir` in the clear, in memory, while the context lasts (the
        runtime's restore must have read it by then); an image that was never sealed as is."""
        sealed = await asyncio.to_thread(
            lambda: any(p.is_file() and is_sealed(p) for p in image_dir.iterdir())
        )
        if not sealed:
            yield image_dir
            return
        staged = self._in_memory()
        clear = await asyncio.to_thread(staged.__enter__)
        try:
            await asyncio.to_thread(self._open, image_dir, clear)
            yield clear
        finally:
            await asyncio.to_thread(staged.__exit__, None, None, None)
