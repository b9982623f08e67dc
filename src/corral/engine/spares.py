"""Spare disks kept ready for cold creates (`corral.host.spares`): after a create took one, or
found none, the next are formatted in the gaps of live traffic, as warm pools are filled."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from corral.core.errors import CorralError
from corral.engine.tasks import finish_in_thread
from corral.host.spares import SpareDisks

log = logging.getLogger("corral.engine.spares")

RETRY_AFTER = 60.0  # seconds before spares are tried again after one could not be made


class SpareKeeper:
    """Makes the spares `spares` wants, one at a time, whenever `quiet` allows."""

    def __init__(self, spares: SpareDisks, quiet: Callable[[], Awaitable[Any]]) -> None:
        self.spares = spares
        self._quiet = quiet
        self._filling: asyncio.Task[None] | None = None
        self._failed_at = -RETRY_AFTER
        self._stopping = False

    def want(self) -> None:
        """A create has ended (it took a spare, or found none): make what the next may take."""
        if (
            self._filling is None
            and not self._stopping
            and time.monotonic() - self._failed_at >= RETRY_AFTER
            and self.spares.wanted() is not None
        ):
            self._filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        try:
            while (size := self.spares.wanted()) is not None:
                await self._quiet()
                await finish_in_thread(functools.partial(self.spares.make, size))
        except (OSError, CorralError) as exc:  # a cache: creates format their own meanwhile
            self._failed_at = time.monotonic()
            log.warning("no spare disks for now: %s", exc)
        finally:
            self._filling = None

    async def stop(self) -> None:
        """Stop making spares and remove them (the engine is closing)."""
        self._stopping = True
        try:
            if self._filling is not None:
                self._filling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._filling
            await asyncio.to_thread(self.spares.remove_all)
        finally:
            self._stopping = False
