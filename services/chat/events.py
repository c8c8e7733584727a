"""Event fan-out to StreamChat subscribers.

Every numbered event is published after its transaction committed: to a Redis stream per
chat (bounded, so reconnecting clients find in-flight parts) when Redis is configured, or
to an in-process buffer otherwise. A subscriber replays durable events from Postgres and
buffered ones after its `after_seq`, then follows live events; a gap in the live sequence
is filled from Postgres (the seq allocation's row lock guarantees every lower durable
event committed before a higher seq exists) and from the buffer (streaming events). A
subscriber that falls behind its bounded queue is dropped with RESOURCE_EXHAUSTED instead of
slowing the loop.

While Redis is unreachable a replica stops calling it (one warning when it goes, one line when
it is back, a probe in between) and relays what it publishes through Postgres NOTIFY
(`services/chat/relay.py`), so subscribers on other replicas still get live events.
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

from services.chat.relay import PgRelay, is_stub, pack, unpack
from services.common.errors import ResourceExhausted

log = logging.getLogger(__name__)

ORIGIN_BYTES = 8
# Events published while Redis is down that a replica keeps to append to the buffers on its return
# (a longer outage keeps the latest ones).
MAX_UNBUFFERED = 10_000

DurableReader = Callable[[str, int, int | None], Awaitable[list[chat_pb2.ChatEvent]]]


class _Subscriber:
    """One StreamChat call's bounded queue."""

    def __init__(self, size: int, after_seq: int) -> None:
        self.queue: asyncio.Queue[chat_pb2.ChatEvent] = asyncio.Queue(maxsize=size)
        self.dropped = False
        self.wake = asyncio.Event()
        # The last seq handed to the client (a replay offers only what comes after it).
        self.last = after_seq

    def offer(self, event: chat_pb2.ChatEvent) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
        self.wake.set()


class EventHub:
    """Publishes chat events and serves subscriptions (Redis streams + pub/sub, or in-process).

    With Redis, a publish does three things: it offers the events to this replica's own
    subscribers at once (no Redis round trip on the way back), appends them to the chat's
    bounded Redis stream (what a reconnecting client replays), and PUBLISHes them on the chat's
    channel, tagged with this replica's origin, for subscribers on other replicas. One pub/sub
    connection per replica follows the channel of every chat with local subscribers and skips
    its own messages; each delivery costs O(1) whatever the number of followed chats.

    When a Redis call fails the hub marks Redis down (logged once): it stops calling it, hands
    what it publishes to `relay` (Postgres NOTIFY) instead, and probes Redis every
    `probe_seconds`. Once a probe succeeds (logged once) it appends to the buffers what it
    published meanwhile, follows its chats again, replays what Redis buffered meanwhile, and keeps
    relaying for `overlap_seconds` more, so subscribers of replicas that notice the return later
    miss nothing (duplicates are dropped by seq). A subscriber fills a gap in the live sequence
    from the buffer and Postgres: a newer event may come through Redis before an older one still
    on its way through the relay.
    """

    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        buffer_size: int = 2000,
        subscriber_queue_size: int = 1000,
        poll_seconds: float | None = None,
        key_prefix: str = "agentplane:chat:events:",
        confirm_timeout: float = 5.0,
        relay: PgRelay | None = None,
        probe_seconds: float = 1.0,
        overlap_seconds: float = 5.0,
    ) -> None:
        self._redis = redis
        self._buffer_size = buffer_size
        self._queue_size = subscriber_queue_size
        # The durable poll is how events of other replicas arrive without Redis; with Redis it
        # is only a safety net for a lost pub/sub message.
        self._poll = poll_seconds if poll_seconds is not None else (5.0 if redis is not None else 1.0)
        # Without Redis (down), the poll is what brings durable events a relay could not.
        self._degraded_poll = min(self._poll, 1.0)
        self._prefix = key_prefix
        self._channel_prefix = f"{key_prefix}live:".encode()
        self._subs: dict[str, set[_Subscriber]] = collections.defaultdict(set)
        self._local: dict[str, collections.deque[chat_pb2.ChatEvent]] = {}
        self._origin = uuid.uuid4().bytes[:ORIGIN_BYTES]
        self._confirm_timeout = confirm_timeout
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._unsubscribing: dict[bytes, asyncio.Task[None]] = {}
        # Per channel: SUBSCRIBE commands sent and confirmations received (Redis answers in
        # order, so the n-th confirmation answers the n-th SUBSCRIBE), and who waits for which.
        self._followed: set[bytes] = set()
        self._sent: dict[bytes, int] = {}
        self._confirmed: dict[bytes, int] = {}
        self._waiters: dict[bytes, list[tuple[int, asyncio.Future[None]]]] = {}
        self._resync = False
        self._closed = False
        self._relay = relay
        self._probe_seconds = probe_seconds
        self._overlap_seconds = overlap_seconds
        self._redis_up = True
        self._up = asyncio.Event()
        self._up.set()
        self._prober: asyncio.Task[None] | None = None
        self._relay_until = 0.0
        # What was published while Redis was down, by chat: appended to the buffers on the way back.
        self._unbuffered: dict[str, list[chat_pb2.ChatEvent]] = {}
        self._unbuffered_count = 0

    def _key(self, chat_id: str) -> str:
        return f"{self._prefix}{chat_id}"

    def _channel(self, chat_id: str) -> bytes:
        return self._channel_prefix + chat_id.encode()

    def _offer(self, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        subs = self._subs.get(chat_id)
        if subs:
            for sub in list(subs):
                for ev in events:
                    sub.offer(ev)

    async def publish(self, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        """Publish committed events (never raises: Redis holds nothing that cannot be lost)."""
        if self._redis is None:
            buf = self._local.get(chat_id)
            if buf is None:
                buf = self._local[chat_id] = collections.deque(maxlen=self._buffer_size)
            buf.extend(events)
            self._offer(chat_id, events)
            return
        self._offer(chat_id, events)
        if self._redis_up:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    self._append(pipe, chat_id, events)
                    pipe.expire(self._key(chat_id), 24 * 3600)
                    await pipe.execute()
            except Exception as exc:
                self._redis_failed("publishing chat events", exc)
        if self._relaying():
            self._relay.send(chat_id, events)  # type: ignore[union-attr]
        if not self._redis_up:
            self._keep_unbuffered(chat_id, events)

    async def publish_many(self, batch: Sequence[tuple[str, Sequence[chat_pb2.ChatEvent]]]) -> None:
        """Publish committed events of many chats at once (one Redis round trip); never raises."""
        if self._redis is None:
            for chat_id, events in batch:
                await self.publish(chat_id, events)
            return
        for chat_id, events in batch:
            self._offer(chat_id, events)
        if self._redis_up:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for chat_id, events in batch:
                        # Streaming events only come while a run is busy: the expiry set by the
                        # run's durable events covers them, so no EXPIRE per batch.
                        self._append(pipe, chat_id, events)
                    await pipe.execute()
            except Exception as exc:
                self._redis_failed("publishing chat events", exc)
        if self._relaying():
            for chat_id, events in batch:
                self._relay.send(chat_id, events)  # type: ignore[union-attr]
        if not self._redis_up:
            for chat_id, events in batch:
                self._keep_unbuffered(chat_id, events)

    def _keep_unbuffered(self, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        """Remember events published while Redis is down (the failed batch included: it may or may
        not have reached Redis) to append them to the chat's buffer on the way back. A long outage
        keeps the latest: those still on their way through the relay when Redis returns."""
        if self._unbuffered_count + len(events) > MAX_UNBUFFERED:
            self._unbuffered.clear()
            self._unbuffered_count = 0
        self._unbuffered.setdefault(chat_id, []).extend(events)
        self._unbuffered_count += len(events)

    def _relaying(self) -> bool:
        """Whether published events go through the Postgres relay too (Redis down, or just back)."""
        if self._relay is None:
            return False
        return not self._redis_up or asyncio.get_running_loop().time() < self._relay_until

    def relayed(self, payload: str) -> None:
        """A notification on the relay channel (`Notifier` handler): offer another replica's events
        to this replica's subscribers of that chat."""
        if self._relay is None:
            return
        chat_id, events = self._relay.receive(payload, self._subs.__contains__)
        if events:
            self._offer(chat_id, events)

    @property
    def redis_up(self) -> bool:
        """Whether this hub uses Redis now (False while it is unreachable)."""
        return self._redis is not None and self._redis_up

    def _redis_failed(self, doing: str, exc: BaseException) -> None:
        """Mark Redis down (logged once per outage) and start probing for its return."""
        if not self._redis_up or self._closed:
            return
        self._redis_up = False
        self._up.clear()
        log.warning(
            "redis is unreachable (%s failed: %s); live chat events go through postgres until it is back",
            doing,
            exc,
            extra={"error": str(exc)},
        )
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(
                self._probe(), name="chat-events-redis-probe"
            )

    async def _probe(self) -> None:
        """Until Redis answers a write: wait `probe_seconds`, try again. Then go back to it."""
        assert self._redis is not None
        while not self._closed:
            await asyncio.sleep(self._probe_seconds)
            try:
                async with asyncio.timeout(max(self._probe_seconds, 1.0)):
                    # A write, as publishing is: a Redis that answers PING but refuses writes
                    # (out of memory, a read-only replica) is still down for us.
                    await self._redis.set(f"{self._prefix}probe", b"1", ex=60)
                    await self._append_unbuffered()
            except Exception:
                continue
            break
        if self._closed:
            return
        self._relay_until = asyncio.get_running_loop().time() + self._overlap_seconds
        self._redis_up = True
        self._up.set()
        log.warning("redis is reachable again; live chat events go through it again")
        # Follow the chats subscribed to during the outage; the reader replays what the
        # buffers got meanwhile.
        for chat_id in list(self._subs):
            await self._follow(chat_id)
        self._resync = True

    async def _append_unbuffered(self) -> None:
        """Append to the buffers what was published while Redis was down, before anything new is
        published through Redis again: the relay and Redis pub/sub are not ordered, so another
        replica's subscriber may get a newer event through Redis first and fill the gap; the
        gap's streaming events are then found in the buffer (Postgres has the durable ones)."""
        assert self._redis is not None
        while self._unbuffered:  # (no await between the last check and going back up)
            kept, self._unbuffered, self._unbuffered_count = self._unbuffered, {}, 0
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for chat_id, events in kept.items():
                        for ev in events:
                            pipe.xadd(
                                self._key(chat_id),
                                {"e": ev.SerializeToString()},
                                maxlen=self._buffer_size,
                                approximate=True,
                            )
                        pipe.expire(self._key(chat_id), 24 * 3600)
                    await pipe.execute()
            except BaseException:
                for chat_id, events in kept.items():  # still down: keep them for the next probe
                    self._keep_unbuffered(chat_id, events)
                raise

    def _append(self, pipe: Any, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        """Queue on `pipe` the stream entries and the one pub/sub message for `events`."""
        key = self._key(chat_id)
        for ev in events:
            pipe.xadd(key, {"e": ev.SerializeToString()}, maxlen=self._buffer_size, approximate=True)
        pipe.publish(self._channel(chat_id), self._origin + pack(events))

    async def _buffered(self, chat_id: str, after_seq: int) -> list[chat_pb2.ChatEvent]:
        """Buffered events after `after_seq`."""
        if self._redis is None:
            return [ev for ev in self._local.get(chat_id, ()) if ev.seq > after_seq]
        if not self._redis_up:
            return []
        try:
            entries: Any = await self._redis.xrange(self._key(chat_id), "-", "+")
        except Exception as exc:
            self._redis_failed("reading chat events", exc)
            return []
        out = []
        for _, fields in entries:
            ev = chat_pb2.ChatEvent.FromString(fields[b"e"])
            if ev.seq > after_seq:
                out.append(ev)
        return out

    async def _follow(self, chat_id: str) -> None:
        """Have this replica's pub/sub connection follow `chat_id`; returns once Redis confirmed."""
        if self._redis is None or not self._redis_up:
            return  # (down: the relay brings live events; the probe follows the chat on return)
        channel = self._channel(chat_id)
        waiter: asyncio.Future[None]
        if channel in self._followed:
            # Subscribed already, or a SUBSCRIBE is on its way: wait for the latest one.
            target = self._sent.get(channel, 0)
            if self._confirmed.get(channel, 0) >= target:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(channel, []).append((target, waiter))
        else:
            pending = self._unsubscribing.get(channel)
            if pending is not None:
                # Let the UNSUBSCRIBE go out first, or it would cancel this SUBSCRIBE.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(pending)
                if channel in self._followed:
                    return await self._follow(chat_id)
            self._followed.add(channel)
            target = self._sent[channel] = self._sent.get(channel, 0) + 1
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(channel, []).append((target, waiter))
            try:
                if self._pubsub is None:
                    self._pubsub = self._redis.pubsub()
                    await self._pubsub.subscribe(channel)
                    # Every later connect is a reconnect: what was published meanwhile is lost to
                    # pub/sub, so the reader replays the buffers (redis-py may reconnect without
                    # ever raising to us, inside its own retry).
                    self._pubsub.connection.register_connect_callback(self._reconnected)
                else:
                    await self._pubsub.subscribe(channel)
            except Exception as exc:  # live events of other replicas then come from the relay
                self._redis_failed("subscribing to chat events", exc)
                # Not followed after all: nobody waits for this SUBSCRIBE (others waiting for it
                # go on without it) and the next subscription tries again.
                self._followed.discard(channel)
                self._sent[channel] = self._confirmed.get(channel, 0)
                for _, other in self._waiters.pop(channel, []):
                    if not other.done():
                        other.set_result(None)
                return
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read())
        try:
            async with asyncio.timeout(self._confirm_timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            if self._redis_up:  # (down meanwhile: that was logged, and the relay takes over)
                log.warning("redis did not confirm a chat event subscription", extra={"chat_id": chat_id})

    def _unfollow(self, chat_id: str) -> None:
        channel = self._channel(chat_id)
        if channel not in self._followed or self._pubsub is None:
            return
        self._followed.discard(channel)

        async def unsubscribe() -> None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

        task = asyncio.get_running_loop().create_task(unsubscribe())
        self._unsubscribing[channel] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._unsubscribing.get(channel) is task:
                del self._unsubscribing[channel]

        task.add_done_callback(done)

    async def _read(self) -> None:
        """Deliver other replicas' pub/sub messages to this replica's subscribers."""
        prefix_len = len(self._channel_prefix)
        while not self._closed:
            try:
                if self._resync:
                    self._resync = False
                    await self._replay()
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection resubscribes; replay what we may have missed
                self._redis_failed("reading chat events", exc)
                self._resync = True
                # Quiet until the probe sees Redis again (a reconnect per message would spin).
                await self._up.wait()
                continue
            if message is None:
                continue
            kind = message.get("type")
            channel = message.get("channel")
            if kind == "message":
                data = message["data"]
                if data[:ORIGIN_BYTES] == self._origin:
                    continue  # published here: already offered to the local subscribers
                chat_id = channel[prefix_len:].decode()
                if chat_id in self._subs:
                    self._offer(chat_id, unpack(data, ORIGIN_BYTES))
            elif kind == "subscribe":
                self._confirm(channel)
            elif kind == "unsubscribe" and channel not in self._followed:
                if self._sent.get(channel, 0) <= self._confirmed.get(channel, 0):
                    self._sent.pop(channel, None)
                    self._confirmed.pop(channel, None)

    async def _reconnected(self, _connection: object) -> None:
        self._resync = True

    def _confirm(self, channel: bytes) -> None:
        confirmed = self._confirmed[channel] = self._confirmed.get(channel, 0) + 1
        waiters = self._waiters.get(channel)
        if not waiters:
            return
        keep = []
        for target, waiter in waiters:
            if target <= confirmed:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                keep.append((target, waiter))
        if keep:
            self._waiters[channel] = keep
        else:
            del self._waiters[channel]

    async def _replay(self) -> None:
        """After a lost pub/sub connection: offer every followed chat's buffered events again."""
        for chat_id in list(self._subs):
            events = await self._buffered(chat_id, 0)
            for sub in list(self._subs.get(chat_id, ())):
                for ev in events:
                    if ev.seq > sub.last:
                        sub.offer(ev)

    async def subscribe(
        self, chat_id: str, after_seq: int, durable: DurableReader
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Events of `chat_id` after `after_seq`, exactly once and in order, until cancelled."""
        sub = _Subscriber(self._queue_size, after_seq)
        self._subs[chat_id].add(sub)
        try:
            # Follow first, then read the buffer: whatever is published after the buffer read
            # arrives live (duplicates are dropped by seq below).
            await self._follow(chat_id)
            buffered = await self._buffered(chat_id, after_seq)
            stored = await durable(chat_id, after_seq, None)
            merged = {ev.seq: ev for ev in buffered}
            merged.update({ev.seq: ev for ev in stored})
            for seq in sorted(merged):
                yield merged[seq]
                sub.last = seq
            while True:
                if sub.dropped:
                    raise ResourceExhausted(
                        f"the stream of chat {chat_id} fell more than {self._queue_size} events behind"
                        f" and was dropped; reconnect with after_seq={sub.last}",
                        reason="SUBSCRIBER_TOO_SLOW",
                        metadata={"chat_id": chat_id, "last_seq": str(sub.last)},
                    )
                if sub.queue.empty():
                    sub.wake.clear()
                    try:
                        async with asyncio.timeout(self._poll if self._redis_up else self._degraded_poll):
                            await sub.wake.wait()
                    except TimeoutError:
                        # Fallback for events published elsewhere without Redis: poll Postgres.
                        for ev in await durable(chat_id, sub.last, None):
                            yield ev
                            sub.last = ev.seq
                    continue
                coalesced = _coalesce(sub.queue, sub.last)
                if coalesced is None:
                    continue
                first, live = coalesced
                if is_stub(live):
                    # A relayed event too large for a notification: durable, so in Postgres.
                    for ev in await durable(chat_id, sub.last, live.seq + 1):
                        yield ev
                        sub.last = ev.seq
                    continue
                if first > sub.last + 1:
                    # Durable events are in Postgres; streaming ones another replica relayed while
                    # Redis was away may still be on their way, and are in the buffer since its
                    # return (`_append_unbuffered`).
                    gap = {ev.seq: ev for ev in await self._buffered(chat_id, sub.last) if ev.seq < first}
                    gap.update({ev.seq: ev for ev in await durable(chat_id, sub.last, first)})
                    for seq in sorted(gap):
                        yield gap[seq]
                        sub.last = seq
                yield live
                sub.last = live.seq
        finally:
            subs = self._subs.get(chat_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[chat_id]
                    self._unfollow(chat_id)

    def subscribers(self, chat_id: str) -> int:
        """How many StreamChat calls of this replica follow `chat_id`."""
        return len(self._subs.get(chat_id, ()))

    def follows(self, chat_id: str) -> bool:
        """Whether this replica's pub/sub connection follows `chat_id` (confirmed by Redis)."""
        channel = self._channel(chat_id)
        return channel in self._followed and self._confirmed.get(channel, 0) >= self._sent.get(channel, 1)

    async def close(self) -> None:
        """Stop the reader and drop the pub/sub connection."""
        self._closed = True
        self._followed.clear()
        self._up.set()  # releases a reader waiting for Redis
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await prober
        if self._relay is not None:
            await self._relay.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        for task in list(self._unsubscribing.values()):
            task.cancel()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None


def _coalesce(queue: asyncio.Queue[chat_pb2.ChatEvent], last: int) -> tuple[int, chat_pb2.ChatEvent] | None:
    """The next queued event after seq `last` (older ones are dropped: the client has them), with
    the consecutive deltas of the same part queued behind it merged into it (it then has the seq
    of the last one); None if none. Returned with the seq of the first of the events it stands for."""
    while True:
        if queue.empty():
            return None
        ev = queue.get_nowait()
        if ev.seq > last:
            break
    first = ev.seq
    if ev.WhichOneof("event") != "part_delta":
        return first, ev
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
    return first, ev
