"""A worker's liveness, as other replicas see it: a session-level advisory lock on a connection of its own.

While a worker runs it holds ``pg_try_advisory_lock(LIVENESS_CLASS, hashtext(worker_id))``
(`services.chat.store.leases`). Postgres drops the lock the moment the session ends: the process
was killed (its socket closes with it), the database restarted, or the connection was cut. Any
replica's sweep hands back the chats of a worker whose lock is gone (`Leases.sweep`), so a killed
replica's chats are claimed again within one sweep interval instead of one lease; the lease stays
the backstop for what the server cannot see at once (a partitioned host keeps its session open).

The connection runs no statement while it holds the lock: waiting for the session to end is
waiting for its socket to become readable, so liveness costs the database nothing at idle. It is
separate from the LISTEN connection (`notify.py`), which API-only replicas also use and whose
reconnects must not wait for a lock.

When the lock is lost while the worker lives, `on_lost` runs at once: from then on other replicas
may take its chats, so the worker must stop its runs (their writes are fenced anyway; stopping
them keeps two replicas from running the same tools). The lock is taken again as soon as a new
session can be opened, and `on_held` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg

from services.chat.store.leases import TAKE_LIVENESS_LOCK

log = logging.getLogger(__name__)

# What the chat service's sessions are called in pg_stat_activity.
APPLICATION_NAME = "agentplane-chat-liveness"


class LivenessLock:
    """Holds this worker's liveness lock; calls `on_held` / `on_lost` as it is taken and lost."""

    def __init__(
        self,
        database_url: str,
        worker_id: str,
        *,
        on_held: Callable[[], None],
        on_lost: Callable[[], None],
        retry_seconds: float = 1.0,
    ) -> None:
        self._url = database_url
        self._worker_id = worker_id
        self._on_held = on_held
        self._on_lost = on_lost
        self._retry = retry_seconds
        self._task: asyncio.Task[None] | None = None
        self._held = asyncio.Event()

    @property
    def held(self) -> bool:
        """Whether the lock is held now (the worker may claim chats)."""
        return self._held.is_set()

    async def start(self, within: float = 10.0) -> None:
        """Start holding the lock; returns once it is held (or after `within` seconds)."""
        self._task = asyncio.create_task(self._run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._held.wait(), within)

    async def _run(self) -> None:
        trouble = False  # logged once per outage, not once a second
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=10,
                    application_name=APPLICATION_NAME,
                    # A server that vanished without closing the connection is noticed within
                    # about a minute; the lease stops the runs earlier (see Worker).
                    keepalives=1,
                    keepalives_idle=30,
                    keepalives_interval=10,
                    keepalives_count=3,
                ) as conn:
                    cur = await conn.execute(TAKE_LIVENESS_LOCK, (self._worker_id,))
                    row = await cur.fetchone()
                    if row is None or not row[0]:
                        # Another session holds it: an earlier session of this worker that the
                        # server has not seen end yet, or another process with the same worker id.
                        if not trouble:
                            trouble = True
                            log.warning(
                                "another database session holds this worker's liveness lock; retrying",
                                extra={"worker_id": self._worker_id},
                            )
                    else:
                        if trouble:
                            trouble = False
                            log.warning("liveness lock held again", extra={"worker_id": self._worker_id})
                        self._set(True)
                        # Returns (by raising) only when the session ends.
                        async for _ in conn.notifies():
                            pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not trouble:
                    trouble = True
                    log.warning(
                        "lost the database session holding this worker's liveness lock; reconnecting",
                        extra={"worker_id": self._worker_id, "error": str(exc)},
                    )
            finally:
                self._set(False)
            await asyncio.sleep(self._retry)

    def _set(self, held: bool) -> None:
        if held == self._held.is_set():
            return
        if held:
            self._held.set()
            callback = self._on_held
        else:
            self._held.clear()
            callback = self._on_lost
        try:
            callback()
        except Exception:
            log.exception("liveness callback failed")

    async def stop(self) -> None:
        """Give the lock up (closing its session) without calling `on_lost`."""
        self._on_lost = lambda: None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
