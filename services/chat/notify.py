"""One Postgres LISTEN connection per replica, dispatching notifications to local handlers.

Channels: pending chats (wake a worker), interrupts (tell the owning worker), chat list
changes (WatchChats), and live chat events relayed while Redis is unreachable (`relay.py`).
Notifications are sent by the writers inside their transactions, so they arrive only after the
commit. When the connection drops it is re-opened (logged once per outage); the workers'
periodic poll and the streams' durable poll cover anything missed meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

import psycopg

log = logging.getLogger(__name__)

Handler = Callable[[str], None]


class Notifier:
    """Listens on channels and calls every handler registered for a channel with the payload."""

    def __init__(self, database_url: str, channels: list[str]) -> None:
        self._url = database_url
        self._channels = channels
        self._handlers: dict[str, list[Handler]] = collections.defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def add(self, channel: str, handler: Handler) -> Callable[[], None]:
        """Register `handler` for `channel`; returns a function that removes it."""
        self._handlers[channel].append(handler)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._handlers[channel].remove(handler)

        return remove

    async def start(self) -> None:
        """Start listening; returns once the LISTEN statements ran (or after 10 s)."""
        self._task = asyncio.create_task(self._run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), 10)

    async def _run(self) -> None:
        lost = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as conn:
                    for ch in self._channels:
                        await conn.execute(f"LISTEN {ch}")
                    if lost:
                        lost = False
                        log.warning("LISTEN connection is back")
                    self.ready.set()
                    async for note in conn.notifies():
                        for handler in list(self._handlers.get(note.channel, ())):
                            try:
                                handler(note.payload)
                            except Exception:
                                log.exception("notification handler failed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Once per outage, not once a second while the database is away.
                if not lost:
                    lost = True
                    log.warning(
                        "LISTEN connection lost; reconnecting every second", extra={"error": str(exc)}
                    )
                await asyncio.sleep(1)

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
