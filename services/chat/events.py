"""Event fan-out to StreamChat subscribers.

Every numbered event is published after its transaction committed: to a Redis stream per
chat (bounded, so reconnecting clients find in-flight parts) when Redis is configured, or
to an in-process buffer otherwise. A subscriber replays durable events from Postgres and
buffered ones after its `after_seq`, then follows live events; a gap in the live sequence
is filled from Postgres (the seq allocation's row lock guarantees every lower durable
event committed before a higher seq exists). A subscriber that falls behind its bounded
queue is dropped with RESOURCE_EXHAUSTED instead of slowing the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from agentplane.chat.v1 import chat_pb2

from services.common.errors import ResourceExhausted

log = logging.getLogger(__name__)

DurableReader = Callable[[str, int, int | None], Awaitable[list[chat_pb2.ChatEvent]]]


class _Subscriber:
    """One StreamChat call's bounded queue."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[chat_pb2.ChatEvent] = asyncio.Queue(maxsize=size)
        self.dropped = False
        self.wake = asyncio.Event()

    def offer(self, event: chat_pb2.ChatEvent) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
        self.wake.set()


class EventHub:
    """Publishes chat events and serves subscriptions (Redis streams or in-process)."""

    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        buffer_size: int = 2000,
        subscriber_queue_size: int = 1000,
        poll_seconds: float = 1.0,
        key_prefix: str = "agentplane:chat:events:",
    ) -> None:
        self._redis = redis
        self._buffer_size = buffer_size
        self._queue_size = subscriber_queue_size
        self._poll = poll_seconds
        self._prefix = key_prefix
        self._subs: dict[str, set[_Subscriber]] = collections.defaultdict(set)
        self._local: dict[str, collections.deque[chat_pb2.ChatEvent]] = {}
        # One reader per replica follows every chat with local subscribers in a single blocking
        # XREAD (a reader per chat cost one Redis round trip per chat per published batch).
        # `_positions` holds the last stream id read per followed chat; subscribing to a chat
        # the reader does not follow yet wakes it through this replica's own wake stream.
        self._positions: dict[str, str] = {}
        self._reader: asyncio.Task[None] | None = None
        self._wake_key = f"{key_prefix}wake:{uuid.uuid4().hex}"
        self._wake_pos = "0-0"
        self._closed = False

    def _key(self, chat_id: str) -> str:
        return f"{self._prefix}{chat_id}"

    async def publish(self, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        """Publish committed events (never raises: Redis holds nothing that cannot be lost)."""
        if self._redis is None:
            buf = self._local.get(chat_id)
            if buf is None:
                buf = self._local[chat_id] = collections.deque(maxlen=self._buffer_size)
            for ev in events:
                buf.append(ev)
                for sub in self._subs.get(chat_id, ()):
                    sub.offer(ev)
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for ev in events:
                    pipe.xadd(
                        self._key(chat_id),
                        {"e": ev.SerializeToString()},
                        maxlen=self._buffer_size,
                        approximate=True,
                    )
                pipe.expire(self._key(chat_id), 24 * 3600)
                await pipe.execute()
        except Exception as exc:  # subscribers fall back to Postgres for durable events
            log.warning(
                "publishing chat events to redis failed", extra={"chat_id": chat_id, "error": str(exc)}
            )
            for ev in events:
                for sub in self._subs.get(chat_id, ()):
                    sub.offer(ev)

    async def publish_many(self, batch: Sequence[tuple[str, Sequence[chat_pb2.ChatEvent]]]) -> None:
        """Publish committed events of many chats at once (one Redis round trip); never raises."""
        if self._redis is None:
            for chat_id, events in batch:
                await self.publish(chat_id, events)
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for chat_id, events in batch:
                    key = self._key(chat_id)
                    for ev in events:
                        pipe.xadd(
                            key, {"e": ev.SerializeToString()}, maxlen=self._buffer_size, approximate=True
                        )
                    # Streaming events only come while a run is busy: the expiry set by the
                    # run's durable events covers them, so no EXPIRE per batch.
                await pipe.execute()
        except Exception as exc:  # these are streaming events: local subscribers still get them
            log.warning("publishing chat events to redis failed", extra={"error": str(exc)})
            for chat_id, events in batch:
                for ev in events:
                    for sub in self._subs.get(chat_id, ()):
                        sub.offer(ev)

    async def _buffered(self, chat_id: str, after_seq: int) -> tuple[list[chat_pb2.ChatEvent], str]:
        """Buffered events after `after_seq`, and the Redis stream id to follow from."""
        if self._redis is None:
            return [ev for ev in self._local.get(chat_id, ()) if ev.seq > after_seq], ""
        try:
            entries: Any = await self._redis.xrange(self._key(chat_id), "-", "+")
        except Exception as exc:
            log.warning("reading chat events from redis failed", extra={"error": str(exc)})
            return [], "$"
        out = []
        last_id = "0-0"
        for entry_id, fields in entries:
            last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            ev = chat_pb2.ChatEvent.FromString(fields[b"e"])
            if ev.seq > after_seq:
                out.append(ev)
        return out, last_id

    async def _follow(self, chat_id: str, start_id: str) -> None:
        """Have the replica's reader follow `chat_id` from `start_id` (no-op if it already does)."""
        if self._redis is None or chat_id in self._positions:
            return
        self._positions[chat_id] = start_id
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
            return
        # The reader may be blocked in an XREAD that does not name this chat: wake it.
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": b"1"}, maxlen=16, approximate=True)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()
        except Exception as exc:  # the reader picks the chat up when its block times out
            log.warning("waking the chat event reader failed", extra={"error": str(exc)})

    async def _read(self) -> None:
        """Follow the Redis streams of every chat with local subscribers, in one XREAD."""
        assert self._redis is not None
        prefix_len = len(self._prefix)
        while self._positions:
            streams: dict[Any, Any] = {self._key(c): pos for c, pos in self._positions.items()}
            streams[self._wake_key] = self._wake_pos
            try:
                res: Any = await self._redis.xread(streams, block=1000, count=500)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("xread failed", extra={"error": str(exc)})
                await asyncio.sleep(0.5)
                continue
            for raw_key, entries in res or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                if not entries:
                    continue
                if key == self._wake_key:
                    last = entries[-1][0]
                    self._wake_pos = last.decode() if isinstance(last, bytes) else last
                    continue
                chat_id = key[prefix_len:]
                if chat_id not in self._positions:
                    continue  # its last subscriber left while the XREAD was in flight
                for entry_id, fields in entries:
                    self._positions[chat_id] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    ev = chat_pb2.ChatEvent.FromString(fields[b"e"])
                    for sub in list(self._subs.get(chat_id, ())):
                        sub.offer(ev)

    async def subscribe(
        self, chat_id: str, after_seq: int, durable: DurableReader
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Events of `chat_id` after `after_seq`, exactly once and in order, until cancelled."""
        sub = _Subscriber(self._queue_size)
        self._subs[chat_id].add(sub)
        try:
            buffered, start_id = await self._buffered(chat_id, after_seq)
            await self._follow(chat_id, start_id or "$")
            stored = await durable(chat_id, after_seq, None)
            last = after_seq
            merged = {ev.seq: ev for ev in buffered}
            merged.update({ev.seq: ev for ev in stored})
            for seq in sorted(merged):
                yield merged[seq]
                last = seq
            while True:
                if sub.dropped:
                    raise ResourceExhausted(
                        f"the stream of chat {chat_id} fell more than {self._queue_size} events behind"
                        f" and was dropped; reconnect with after_seq={last}",
                        reason="SUBSCRIBER_TOO_SLOW",
                        metadata={"chat_id": chat_id, "last_seq": str(last)},
                    )
                if sub.queue.empty():
                    sub.wake.clear()
                    try:
                        await asyncio.wait_for(sub.wake.wait(), self._poll)
                    except TimeoutError:
                        # Fallback for events published elsewhere without Redis: poll Postgres.
                        for ev in await durable(chat_id, last, None):
                            yield ev
                            last = ev.seq
                    continue
                ev = _coalesce(sub.queue)
                if ev.seq <= last:
                    continue
                if ev.seq > last + 1:
                    for missing in await durable(chat_id, last, ev.seq):
                        yield missing
                        last = missing.seq
                yield ev
                last = ev.seq
        finally:
            subs = self._subs.get(chat_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[chat_id]
                    self._positions.pop(chat_id, None)
                    if not self._positions and self._reader is not None:
                        self._reader.cancel()
                        self._reader = None

    async def close(self) -> None:
        """Stop the reader task."""
        self._closed = True
        self._positions.clear()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.delete(self._wake_key)


def _coalesce(queue: asyncio.Queue[chat_pb2.ChatEvent]) -> chat_pb2.ChatEvent:
    """The next event; consecutive deltas of the same part already queued are merged into it."""
    ev = queue.get_nowait()
    if ev.WhichOneof("event") != "part_delta":
        return ev
    merged: Any = None
    while not queue.empty():
        nxt = queue._queue[0]  # type: ignore[attr-defined]  # peek: asyncio.Queue is a deque inside
        if (
            nxt.WhichOneof("event") != "part_delta"
            or nxt.part_delta.message_id != ev.part_delta.message_id
            or nxt.part_delta.part_index != ev.part_delta.part_index
            or nxt.part_delta.WhichOneof("delta") != ev.part_delta.WhichOneof("delta")
            or nxt.seq != ev.seq + 1
        ):
            break
        queue.get_nowait()
        if merged is None:
            merged = chat_pb2.ChatEvent()
            merged.CopyFrom(ev)
            ev = merged
        kind = ev.part_delta.WhichOneof("delta")
        if kind == "text":
            ev.part_delta.text += nxt.part_delta.text
        else:
            ev.part_delta.reasoning += nxt.part_delta.reasoning
        ev.seq = nxt.seq
        ev.time.CopyFrom(nxt.time)
    return ev
