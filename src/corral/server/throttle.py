"""Failed authentications, counted per client address, so keys cannot be guessed at speed."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque

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
