"""Boot images: a booted sandbox's memory, saved once per configuration, that new sandboxes of
that configuration are restored from instead of booting (restore, as Modal does, not boot).

A create (or a pool's fill) that finds no image for its configuration boots as before and asks
for one. In the background, in the gaps of use, the engine boots a template sandbox of that
configuration, checkpoints it into ``<data>/boots/`` and ends it; later creates restore it.
Only runtimes whose checkpoints keep memory take part (gvisor), and only for sandboxes that
can be checkpointed (no internet access) and mount no volumes.

A restored sandbox is a fresh one: nothing but the agent ever ran in the template, and the
agent takes its new sandbox's hostname before the sandbox is handed to anyone (the template's
agent alone may rename its sandbox, once; see `corral.agent.shield.take_identity`). What it
shares with the others from the same image is what the guest kernel fixed at the template's
boot: /proc/sys/kernel/random/boot_id, and the uptime it started counting from.

The configuration is what is fixed at start plus the image's resolved layers, so a rebuilt
image never restores an old one's files. Boot images are a cache, kept in a memory filesystem
only root can enter (about 15 MiB each, in the clear, so a restore reads them as they are; they
hold no tenant's data and never reach the disk): dropped when the engine stops (an upgraded
agent never restores an old one) and made again on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from corral.core.errors import CorralError
from corral.core.spec import FIXED_AT_START, SandboxSpec
from corral.engine.sealing import KeyRing
from corral.engine.snapshots import Snapshot, SnapshotStore
from corral.engine.tasks import Tasks
from corral.host import mounts
from corral.images.store import RootImage

log = logging.getLogger("corral.engine.boots")

RETRY_AFTER = 60.0  # seconds before a configuration whose image failed is tried again
MAX_IMAGES = 32  # configurations with a boot image at once (about 15 MiB of memory each)
STOP_GRACE = 30.0  # seconds a closing engine waits for the image being booted

BootKey = tuple[Any, ...]
# Boot a template, save it, end it; the image and the key its sandbox's plan gives.
Make = Callable[[SandboxSpec, SnapshotStore], Awaitable[tuple[Snapshot, "BootKey"]]]
Quiet = Callable[[], Awaitable[Any]]  # returns when making one would not slow live traffic


def boot_key(
    spec: SandboxSpec, layers: Sequence[object], binds: Sequence[tuple[str, str]]
) -> BootKey:
    """What a boot image must share with the sandbox restored from it: what is fixed at start,
    the image's layers (topmost first) and its host binds (source, target)."""
    return (
        tuple(getattr(spec, name) for name in FIXED_AT_START),
        tuple(str(layer) for layer in layers),
        tuple(binds),
    )


def key_for(spec: SandboxSpec, image: RootImage, refusal: str | None) -> BootKey | None:
    """The configuration's key among boot images, if its sandboxes may start from one:
    `refusal` is why its runtime cannot checkpoint it (None: it can)."""
    if spec.volumes or refusal is not None:
        return None  # volumes are mounted at start; internet sandboxes cannot be saved
    if image.name.startswith("im-"):
        # Built by a tenant: its python3 would run, as the template's agent, holding the right
        # to rename the sandbox (see `corral.agent.shield.take_identity`).
        return None
    return boot_key(spec, image.layers, [(str(b.source), b.target) for b in image.binds])


class BootImages:
    """The boot images of one engine, by configuration, and the queue that makes them."""

    def __init__(self, root: Path, keys: KeyRing, tasks: Tasks, make: Make) -> None:
        self.root = root
        self.enabled = True
        self.store = SnapshotStore(root, keys)
        self._tasks = tasks
        self._images: dict[BootKey, Snapshot] = {}  # least recently used first
        self._asked: dict[BootKey, float] = {}  # made, being made, or failed at (monotonic)
        self._making = asyncio.Lock()  # one at a time: each is a whole boot
        self._pending: set[asyncio.Task[None]] = set()
        self._booting: asyncio.Task[None] | None = None  # the one past the wait for quiet
        self._make = make
        self._quiet: Quiet | None = None  # none made before `start`
        self.stopped = False
        self._prepared = False  # its memory filesystem is mounted
        self.made = 0
        self.restored = 0

    def prepare(self) -> None:
        """Remove every boot image a previous engine left (see the module's docstring) and
        mount the memory filesystem new ones are kept in (without it, there are none)."""
        self.stopped = False
        try:
            mounts.remove_tree(self.root)
            if not self.enabled:
                return
            self.root.mkdir(mode=0o700)
            mounts.private_tmpfs(self.root)
        except (OSError, CorralError) as exc:
            log.warning("boot images are off: cannot prepare %s for them: %s", self.root, exc)
            self.enabled = False
            return
        self._prepared = True
        self.store.load()

    async def stop(self) -> None:
        """Stop making images and drop every one, with its memory (the engine is closing).
        An image being booted is let finish (a few seconds at most): cancelled half-way, its
        runtime's commands would go on in their threads after the sandbox was cleaned up."""
        self.stopped = True
        for task in self._pending - {self._booting}:
            task.cancel()
        if self._booting is not None:
            await asyncio.wait({self._booting}, timeout=STOP_GRACE)
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._images.clear()
        self._asked.clear()
        if self._prepared:  # this engine's, under its lock: never another engine's
            await asyncio.to_thread(mounts.remove_tree, self.root)
            self._prepared = False

    def start(self, quiet: Quiet) -> None:
        """Begin making images on request, whenever `quiet` allows (as warm pools fill)."""
        self._quiet = quiet

    def find(self, key: BootKey) -> Snapshot | None:
        image = self._images.pop(key, None)
        if image is not None:
            self._images[key] = image  # the most recently used now
        return image

    def want(self, key: BootKey, template: SandboxSpec) -> None:
        """Make an image for `key` in the background, unless one exists or is on its way.
        At `MAX_IMAGES`, the least recently used image makes way."""
        asked = self._asked.get(key)
        if not self.enabled or self.stopped or self._quiet is None or key in self._images:
            return
        if asked is not None and (asked == 0 or time.monotonic() - asked < RETRY_AFTER):
            return
        if sum(1 for at in self._asked.values() if at == 0) >= MAX_IMAGES:  # made or on the way
            if not self._images:
                return  # all on their way
            self.discard(next(iter(self._images)))
        self._asked[key] = 0  # on its way
        task = self._tasks.spawn(self._make_one(key, template))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def discard(self, key: BootKey) -> bool:
        """Stop restoring from `key`'s image (it failed to restore, or makes way); it is made
        again on a later create. False once the engine is closing (boot nothing more)."""
        image = self._images.pop(key, None)
        self._asked[key] = time.monotonic()
        if image is not None:
            with contextlib.suppress(OSError, CorralError):  # gone with the tmpfs, closing
                self.store.delete(image.info.id)
        return not self.stopped

    async def _make_one(self, key: BootKey, template: SandboxSpec) -> None:
        assert self._quiet is not None
        async with self._making:
            await self._quiet()
            if self.stopped:
                return
            self._booting = asyncio.current_task()
            try:
                image, made_for = await self._make(template, self.store)
            except Exception as exc:  # a cache: log it, try again later
                self._asked[key] = time.monotonic()
                log.warning("no boot image for %s yet: %s", template.image, exc)
                return
            finally:
                self._booting = None
        if made_for != key:  # the image was rebuilt meanwhile: the next create asks again
            self._asked.pop(key, None)
        self._asked[made_for] = 0
        old = self._images.pop(made_for, None)
        if old is not None:
            with contextlib.suppress(OSError, CorralError):
                self.store.delete(old.info.id)
        self._images[made_for] = image
        self.made += 1
        log.info("boot image %s made for %s", image.info.id, template.image)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "images": len(self._images),
            "made": self.made,
            "restored": self.restored,
        }
