"""Numbering streaming events of many chats in one statement (group commit).

Streaming events (text and reasoning deltas, tool call started/finished, retry notices) are
never stored, but they still take their seq from ``chat_chats.last_seq`` under the chat row's
lock, so they interleave correctly with durable events written concurrently by the API (queue
changes, interrupts): seqs stay strictly increasing in delivery order and a reconnecting
client gets everything exactly once.

Paying one Postgres round trip per coalesced delta per chat is what limited the chat service
at scale. `EventNumberer` keeps the semantics and batches: emits that arrive while a numbering
statement is in flight wait for the next one, which numbers all of them (any number of chats)
in a single `UPDATE ... FROM unnest(...)` fenced per chat. No latency is added when the
service is idle (a lone emit goes out at once) and the batch grows with the load.
Events of one chat are numbered and published in the order `emit` was called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentplane.chat.v1 import chat_pb2
from google.protobuf import timestamp_pb2
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

PublishMany = Callable[[Sequence[tuple[str, Sequence[chat_pb2.ChatEvent]]]], Awaitable[None]]

# One statement per batch: add each chat's count to last_seq where the fence (if any) holds,
# and note the reply whose deltas it numbers (`streaming_message_id`, cleared when that message
# is persisted: a later run that finds it set announces the reply as discarded; see
# migrations/0002_chat_streaming_reply.sql). A chat missing from the answer lost its fence (or
# was deleted).
NUMBER_SQL = (
    "UPDATE chat_chats AS c SET last_seq = c.last_seq + d.n,"
    " streaming_message_id = coalesce(d.m, c.streaming_message_id)"
    " FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::bigint[], %s::text[]) AS d(id, n, w, g, m)"
    " WHERE c.id = d.id AND (d.w IS NULL OR (c.worker_id = d.w AND c.generation = d.g))"
    " RETURNING c.id::text AS id, c.last_seq"
)


class Unnumbered(Exception):
    """The chat's row did not match: its fence is lost, or the chat is gone."""


@dataclass
class _Emit:
    chat_id: str
    fence: tuple[str, int] | None
    events: Sequence[chat_pb2.ChatEvent]
    done: asyncio.Future[None] = field(repr=False)


class EventNumberer:
    """Batches seq allocation and publishing of streaming events; see the module docstring."""

    def __init__(
        self, pool: AsyncConnectionPool[Any], publish_many: PublishMany, *, max_batch: int = 500
    ) -> None:
        self._pool = pool
        self._publish_many = publish_many
        self._max_batch = max_batch
        self._queue: list[_Emit] = []
        self._task: asyncio.Task[None] | None = None

    async def emit(
        self, chat_id: str, fence: tuple[str, int] | None, events: Sequence[chat_pb2.ChatEvent]
    ) -> None:
        """Number `events` (setting seq, chat_id and time) and publish them; returns once published.

        `fence` is (worker_id, generation) or None. Raises `Unnumbered` when the row did not
        match; other errors (the database is down) are raised as they are.
        """
        if not events:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Emit(chat_id, fence, events, done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # The events are queued and will get their seqs: let that happen before the caller
            # goes on (say, to persist the interrupted message), so nothing it writes next is
            # numbered before them.
            with contextlib.suppress(Exception):
                await done
            raise

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                await self._number(batch)
            except BaseException as exc:
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            ok = [item for item in batch if not item.done.done()]
            try:
                await self._publish(ok)
            finally:
                for item in ok:
                    if not item.done.done():
                        item.done.set_result(None)

    def _take(self) -> list[_Emit]:
        """The next batch: queue order, and every chat under one fence (a rare second fence of the
        same chat, a new run's emit racing an old one's, waits for the next batch)."""
        batch: list[_Emit] = []
        rest: list[_Emit] = []
        fences: dict[str, tuple[str, int] | None] = {}
        blocked: set[str] = set()
        for item in self._queue:
            cid = item.chat_id
            if len(batch) >= self._max_batch or cid in blocked or fences.get(cid, item.fence) != item.fence:
                blocked.add(cid)  # keep this chat's later emits behind this one
                rest.append(item)
                continue
            fences[cid] = item.fence
            batch.append(item)
        self._queue = rest
        return batch

    async def _number(self, batch: list[_Emit]) -> None:
        counts: dict[str, int] = {}
        fences: dict[str, tuple[str, int] | None] = {}
        replies: dict[str, str | None] = {}
        for item in batch:
            counts[item.chat_id] = counts.get(item.chat_id, 0) + len(item.events)
            fences[item.chat_id] = item.fence
            for ev in item.events:
                if ev.WhichOneof("event") == "part_delta" and item.fence is not None:
                    replies[item.chat_id] = ev.part_delta.message_id or None
        ids = list(counts)
        params = (
            ids,
            [counts[c] for c in ids],
            [f[0] if (f := fences[c]) is not None else None for c in ids],
            [f[1] if (f := fences[c]) is not None else None for c in ids],
            [replies.get(c) for c in ids],
        )
        async with self._pool.connection() as conn:
            async with conn.transaction() if not conn.autocommit else contextlib.nullcontext():
                cur = await conn.execute(NUMBER_SQL, params)
                rows = await cur.fetchall()
        last: dict[str, int] = {}
        for row in rows:
            cid, seq = (row["id"], row["last_seq"]) if isinstance(row, dict) else row
            last[str(cid)] = int(seq)
        stamp = timestamp_pb2.Timestamp()
        stamp.GetCurrentTime()
        next_seq = {cid: seq - counts[cid] + 1 for cid, seq in last.items()}
        for item in batch:
            seq = next_seq.get(item.chat_id)
            if seq is None:
                item.done.set_exception(Unnumbered(item.chat_id))
                continue
            for ev in item.events:
                ev.seq = seq
                ev.chat_id = item.chat_id
                ev.time.CopyFrom(stamp)
                seq += 1
            next_seq[item.chat_id] = seq

    async def _publish(self, batch: list[_Emit]) -> None:
        per_chat: dict[str, list[chat_pb2.ChatEvent]] = {}
        for item in batch:
            per_chat.setdefault(item.chat_id, []).extend(item.events)
        if per_chat:
            await self._publish_many(list(per_chat.items()))

    async def close(self) -> None:
        """Wait for the emits already queued."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
