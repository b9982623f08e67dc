"""Spare disks: sandbox quota disks formatted before the creates that take them.

Formatting a new sandbox's disk (`mounts.format_disk`: a sparse file and a `mkfs.ext4`
process) was about 2.3 ms of every cold create. A spare is formatted the same way, in the gaps
of use (`corral.engine.spares`), and a create moves one into its sandbox's directory with a
rename instead. A spare is an empty filesystem that was never mounted, indistinguishable from
one formatted at the create: it holds no one's data.

Only spares this object made are ever taken. Whatever a previous engine left in the directory
(it stopped, or crashed half-way through a format) is removed before the first spare is made.
Thread-safe: creates take spares in worker threads.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

from corral.host import mounts

KEEP = 2  # spares ready at once, of the size the latest create asked for


class SpareDisks:
    """The spare disks in `root` (on the sandboxes' filesystem, for the rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.taken = 0
        self._lock = threading.Lock()
        self._ready: list[Path] = []  # all of `_size` MiB
        self._size: int | None = None  # what the latest create asked for
        self._cleared = False  # what a previous engine left is gone

    def take(self, size_mb: int, image: Path) -> bool:
        """Move a spare of `size_mb` MiB to `image`; False if none is ready (format one)."""
        with self._lock:
            if size_mb != self._size:
                self._size = size_mb
                stale, self._ready = self._ready, []
            else:
                stale = []
            spare = self._ready.pop() if self._ready else None
        for path in stale:
            path.unlink(missing_ok=True)
        if spare is None:
            return False
        try:
            os.replace(spare, image)
        except OSError:
            spare.unlink(missing_ok=True)
            return False
        with self._lock:  # creates take spares from several threads at once
            self.taken += 1
        return True

    def wanted(self) -> int | None:
        """The size in MiB of the next spare to make, or None while enough are ready."""
        with self._lock:
            short = self._size is not None and len(self._ready) < KEEP
            return self._size if short else None

    def make(self, size_mb: int) -> None:
        """Format one spare of `size_mb` MiB (in a worker thread: it runs mkfs)."""
        if not self._cleared:
            mounts.remove_tree(self.root)  # a spare is never mounted: plain files
            self.root.mkdir(mode=0o700, parents=True)
            self._cleared = True
        path = self.root / f"{size_mb}-{secrets.token_hex(8)}.img"
        mounts.format_disk(path, size_mb)
        with self._lock:
            if size_mb == self._size and len(self._ready) < KEEP:
                self._ready.append(path)
                return
        path.unlink()  # creates asked for another size meanwhile, or have enough

    def remove_all(self) -> None:
        """Drop every spare (the engine is closing): the next engine makes its own."""
        with self._lock:
            self._ready.clear()
            self._size = None
        mounts.remove_tree(self.root)
        self._cleared = False
