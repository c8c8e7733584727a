"""The in-memory list of revoked token ids every service checks, and what keeps it fresh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)

DEFAULT_REFRESH_SECONDS = 5.0

# Fetches every current revocation as (token id, expiry as a Unix time).
Fetch = Callable[[], Awaitable[Iterable[tuple[str, float]]]]


class RevocationList:
    """Revoked token ids with their expiry; `is_revoked` is what the auth interceptor asks."""

    def __init__(self) -> None:
        self._revoked: dict[str, float] = {}
        self.refreshed_at = 0.0

    def is_revoked(self, token_id: str) -> bool:
        """True when `token_id` is revoked (and the token not expired anyway)."""
        expires = self._revoked.get(token_id)
        return expires is not None and expires > time.time()

    def add(self, token_id: str, expires: float) -> None:
        """Revoke locally at once (the config process, right after the RevokeToken it served)."""
        self._revoked[token_id] = expires

    def replace(self, entries: Iterable[tuple[str, float]]) -> None:
        """The whole current list (a refresh)."""
        self._revoked = dict(entries)
        self.refreshed_at = time.time()


class RevocationPoller:
    """Refreshes a RevocationList every `interval` seconds; keeps the last list when a refresh fails."""

    def __init__(
        self, revocations: RevocationList, fetch: Fetch, interval: float = DEFAULT_REFRESH_SECONDS
    ) -> None:
        self.revocations = revocations
        self._fetch = fetch
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """One refresh now."""
        self.revocations.replace(await self._fetch())

    def start(self) -> None:
        """Refresh in the background until `stop`."""
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # config or the database away: keep what we have, try again
                log.warning("could not refresh the revoked tokens: %s", exc)
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
