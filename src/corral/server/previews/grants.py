"""Who may use a preview: its token, or anyone for a public one; answers cached for a few
seconds, so a request costs no database read (a revocation through this server clears them at
once; through another server sharing the database, it takes effect within CACHE_SECONDS)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from corral.server.previews.store import PreviewEntry, PreviewStore

CACHE_SECONDS = 5.0


def digest(token: str) -> str:
    """What the store keeps of a token (a token is 192 random bits: no salt or stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


class Grants:
    def __init__(self, store: Callable[[], PreviewStore]) -> None:
        self._store = store
        self._tokens: dict[str, tuple[PreviewEntry | None, float]] = {}
        self._public: dict[tuple[str, int], tuple[bool, float]] = {}

    async def allows(self, sandbox_id: str, port: int, token: str | None) -> bool:
        """Whether `token` (or being public) opens `port` of `sandbox_id`; a token of another
        port or sandbox opens nothing here."""
        now = time.monotonic()
        if token:
            key = digest(token)
            entry, until = self._tokens.get(key, (None, 0.0))
            if until < now:
                entry = await self._store().by_digest(key)
                self._tokens[key] = (entry, now + CACHE_SECONDS)
            granted = entry is not None and entry.active()
            if (
                granted
                and entry is not None
                and (entry.sandbox_id, entry.port) == (sandbox_id, port)
            ):
                return True
        public, until = self._public.get((sandbox_id, port), (False, 0.0))
        if until < now:
            public = await self._store().public(sandbox_id, port)
            self._public[(sandbox_id, port)] = (public, now + CACHE_SECONDS)
        return public

    def forget(self) -> None:
        """Drop every cached answer (a preview was revoked)."""
        self._tokens.clear()
        self._public.clear()
