"""Failed authentications, counted per client address, so keys cannot be guessed at speed; and
expensive calls in flight, counted per key, so one tenant cannot take the node's memory and
threads from the others."""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator

from corral.core.errors import LimitReached

MAX_ADDRESSES = 100_000  # the oldest are forgotten past this: memory stays bounded


class FailedLogins:
    """Past `limit` failed authentications in `window` seconds, an address is refused (429
    with Retry-After) until the window has passed, whatever key it sends: otherwise a right
    guess would still tell itself apart from the wrong ones."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def check(self, address: str) -> None:
        """Refuse `address` if it has failed too often lately."""
        failures = self._recent(address)
        if failures is not None and len(failures) >= self.limit:
            wait = math.ceil(self.window - (time.monotonic() - failures[0]))
            raise LimitReached(
                f"too many failed authentications from {address}; wait {wait} s, and check "
                "the API key you send",
                code="auth_throttled",
                retry_after=max(1, wait),
            )

    def failed(self, address: str) -> None:
        failures = self._recent(address)
        if failures is None:
            failures = self._failures[address] = deque(maxlen=self.limit)
            while len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)
        failures.append(time.monotonic())

    def _recent(self, address: str) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and time.monotonic() - failures[0] > self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        self._failures.move_to_end(address)
        return failures


# Calls of each kind one key may have in flight at once. A build holds a sandbox and an image
# lane thread, an upload a connection and a disk write; commands run to completion are many in
# an agent's work (and cheap), so their bound is on what they buffer instead: BUFFERED_BYTES.
IN_FLIGHT = {"exec": 1024, "build": 2, "upload": 4}
BUFFERED_BYTES = 256 << 20  # output one key's commands run to completion may hold at once


class InFlight:
    """Counts each key's expensive calls in flight; past the kind's limit a call is refused at
    once (429 `too_many_requests`, Retry-After 1) rather than queued."""

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self.limits = dict(IN_FLIGHT if limits is None else limits)
        self._counts: dict[tuple[str, str], int] = {}
        self._buffered: dict[str, int] = {}

    def buffer(self, key_id: str, wanted: int) -> int:
        """How many of `wanted` more output bytes the key's commands may hold now (the rest
        is dropped and the result says `truncated`); give them back with `release`."""
        held = self._buffered.get(key_id, 0)
        granted = max(0, min(wanted, BUFFERED_BYTES - held))
        if granted:
            self._buffered[key_id] = held + granted
        return granted

    def release(self, key_id: str, count: int) -> None:
        left = self._buffered.get(key_id, 0) - count
        if left > 0:
            self._buffered[key_id] = left
        else:
            self._buffered.pop(key_id, None)

    def enter(self, key_id: str, kind: str) -> None:
        slot = (key_id, kind)
        count = self._counts.get(slot, 0)
        if count >= self.limits[kind]:
            raise LimitReached(
                f"this key has {count} {kind} calls in flight, the most this server allows at "
                "once; wait for some to finish and retry",
                code="too_many_requests",
                retry_after=1,
            )
        self._counts[slot] = count + 1

    def leave(self, key_id: str, kind: str) -> None:
        slot = (key_id, kind)
        count = self._counts.get(slot, 0) - 1
        if count > 0:
            self._counts[slot] = count
        else:
            self._counts.pop(slot, None)

    @contextlib.contextmanager
    def hold(self, key_id: str, kind: str) -> Iterator[None]:
        self.enter(key_id, kind)
        try:
            yield
        finally:
            self.leave(key_id, kind)
