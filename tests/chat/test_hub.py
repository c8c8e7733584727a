"""EventHub over a real Redis: one reader per replica follows every subscribed chat."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import pytest
import redis.asyncio as aioredis
from agentplane.chat.v1 import chat_pb2

from services.chat.deltas import EventNumberer
from services.chat.events import EventHub
from services.chat.server import create_chat_pool
from services.chat.settings import ChatSettings
from services.chat.store import ChatStore
from services.common.embedded import free_port
from tests.helpers import wait_until


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[ChatStore]:
    """The store as the chat service builds it; what it publishes is not looked at here."""
    pool = await create_chat_pool(database_url, ChatSettings())

    async def publish(chat_id: str, events: object) -> None:
        return None

    async def publish_many(batch: object) -> None:
        return None

    numberer = EventNumberer(pool, publish_many)
    try:
        yield ChatStore(pool, publish, numberer=numberer)
    finally:
        await numberer.close()
        await pool.close()


async def first_event(hub: EventHub, chat_id: str, store: ChatStore) -> chat_pb2.ChatEvent:
    """The first event a subscription of `chat_id` yields."""
    stream = cast(AsyncGenerator[chat_pb2.ChatEvent, None], hub.subscribe(chat_id, 0, store.events_between))
    try:
        return await anext(stream)
    finally:
        await stream.aclose()


async def test_more_chats_than_redis_connections_all_get_events_from_another_replica(
    redis_url: str, store: ChatStore
) -> None:
    # A per-chat blocking reader would need a connection per chat: with 4 allowed, 12 chats
    # would exhaust the pool and publishing would fail.
    small = aioredis.Redis.from_url(redis_url, max_connections=4)
    publisher_redis = aioredis.Redis.from_url(redis_url)
    subscriber, publisher = EventHub(small), EventHub(publisher_redis)
    chats = [str(uuid.uuid4()) for _ in range(12)]
    try:
        async with asyncio.timeout(20):
            tasks = []
            for cid in chats:
                # One at a time: a subscription's own reads borrow a connection for a moment.
                tasks.append(asyncio.create_task(first_event(subscriber, cid, store)))
                await wait_until(
                    functools.partial(subscriber.follows, cid),
                    what="the replica to follow the chat",
                    timeout=5,
                )
            batch = [
                (cid, [chat_pb2.ChatEvent(seq=1, chat_id=cid, part_delta=chat_pb2.PartDelta(text=cid[:8]))])
                for cid in chats
            ]
            await publisher.publish_many(batch)
            got = await asyncio.gather(*tasks)
        assert [(ev.chat_id, ev.seq, ev.part_delta.text) for ev in got] == [(c, 1, c[:8]) for c in chats]
    finally:
        await subscriber.close()
        await publisher.close()
        await small.aclose()
        await publisher_redis.aclose()


def _delta(chat_id: str, seq: int) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(seq=seq, chat_id=chat_id, part_delta=chat_pb2.PartDelta(text=f"d{seq}"))


async def test_own_publishes_reach_local_subscribers_once_and_in_order(
    redis_url: str, store: ChatStore
) -> None:
    # Local subscribers get a replica's own events directly; the same events also come back
    # over pub/sub (for other replicas) and must not be delivered twice.
    client = aioredis.Redis.from_url(redis_url)
    hub = EventHub(client)
    chat_id = str(uuid.uuid4())
    stream = cast(AsyncGenerator[chat_pb2.ChatEvent, None], hub.subscribe(chat_id, 0, store.events_between))
    try:
        async with asyncio.timeout(20):
            first = asyncio.create_task(anext(stream))
            await wait_until(
                functools.partial(hub.follows, chat_id), what="the replica to follow the chat", timeout=5
            )
            for seq in range(1, 6):
                await hub.publish(chat_id, [_delta(chat_id, seq)])
            seen = [await first]
            while seen[-1].seq < 5:
                seen.append(await anext(stream))
            # Nothing else is queued: a sixth event is the next one yielded.
            await hub.publish(chat_id, [_delta(chat_id, 6)])
            seen.append(await anext(stream))
        texts = "".join(ev.part_delta.text for ev in seen)
        assert texts == "d1d2d3d4d5d6"
        assert seen[-1].seq == 6
    finally:
        await stream.aclose()
        await hub.close()
        await client.aclose()


async def test_resubscribing_right_after_leaving_still_gets_other_replicas_events(
    redis_url: str, store: ChatStore
) -> None:
    # Leaving sends UNSUBSCRIBE; a new subscription right after must not be cancelled by it.
    sub_client, pub_client = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    subscriber, publisher = EventHub(sub_client), EventHub(pub_client)
    chat_id = str(uuid.uuid4())
    try:
        async with asyncio.timeout(20):
            for round_ in range(1, 4):
                first, second = 2 * round_ - 1, 2 * round_
                stream = cast(
                    AsyncGenerator[chat_pb2.ChatEvent, None],
                    subscriber.subscribe(chat_id, first - 1, store.events_between),
                )
                task = asyncio.create_task(anext(stream))
                await wait_until(
                    functools.partial(subscriber.follows, chat_id),
                    what="the replica to follow the chat",
                    timeout=5,
                )
                await publisher.publish(chat_id, [_delta(chat_id, first)])
                assert (await task).seq == first  # from the buffer or live
                # Published after the subscription yielded: only pub/sub can bring it.
                await publisher.publish(chat_id, [_delta(chat_id, second)])
                ev = await anext(stream)
                assert (ev.seq, ev.part_delta.text) == (second, f"d{second}")
                await stream.aclose()
    finally:
        await subscriber.close()
        await publisher.close()
        await sub_client.aclose()
        await pub_client.aclose()


async def test_a_lost_pubsub_connection_loses_no_event(redis_url: str, store: ChatStore) -> None:
    # Redis drops the subscriber replica's pub/sub connection; an event published while it is
    # gone never reaches it over pub/sub, so the hub must replay the buffer after reconnecting.
    sub_client, pub_client = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    subscriber, publisher = EventHub(sub_client), EventHub(pub_client)
    chat_id = str(uuid.uuid4())
    stream = cast(
        AsyncGenerator[chat_pb2.ChatEvent, None], subscriber.subscribe(chat_id, 0, store.events_between)
    )
    try:
        async with asyncio.timeout(20):
            task = asyncio.create_task(anext(stream))
            await wait_until(
                functools.partial(subscriber.follows, chat_id),
                what="the replica to follow the chat",
                timeout=5,
            )
            await publisher.publish(chat_id, [_delta(chat_id, 1)])
            assert (await task).seq == 1
            await publisher.publish(chat_id, [_delta(chat_id, 2)])
            assert (await anext(stream)).seq == 2  # live, over pub/sub
            killed = await admin.client_kill_filter(_type="pubsub")
            assert killed >= 1
            await publisher.publish(chat_id, [_delta(chat_id, 3)])  # nobody is listening now
            got = await anext(stream)
            assert (got.seq, got.part_delta.text) == (3, "d3")
            await publisher.publish(chat_id, [_delta(chat_id, 4)])
            assert (await anext(stream)).seq == 4
    finally:
        await stream.aclose()
        await subscriber.close()
        await publisher.close()
        for client in (sub_client, pub_client, admin):
            await client.aclose()


async def test_without_a_reachable_redis_local_subscribers_still_get_events(store: ChatStore) -> None:
    # Redis refuses connections: subscribing cannot follow the channel and publishing cannot
    # append to the buffer, but this replica's own subscribers get its events all the same,
    # and a failed SUBSCRIBE is not waited for (nor remembered as followed).
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    hub = EventHub(down, confirm_timeout=30)
    chat_id = str(uuid.uuid4())
    streams = [
        cast(AsyncGenerator[chat_pb2.ChatEvent, None], hub.subscribe(chat_id, 0, store.events_between))
        for _ in range(2)
    ]
    try:
        async with asyncio.timeout(20):  # less than one confirmation timeout
            tasks = [asyncio.create_task(anext(stream)) for stream in streams]
            await wait_until(
                lambda: _subscribed(hub, chat_id, 2), what="both subscriptions to register", timeout=15
            )
            await hub.publish(chat_id, [_delta(chat_id, 1)])
            # Both yield once their setup is done: a SUBSCRIBE that failed is not waited for.
            for task in tasks:
                ev = await task
                assert (ev.seq, ev.part_delta.text) == (1, "d1")
            assert not hub.follows(chat_id)
    finally:
        for stream in streams:
            await stream.aclose()
        await hub.close()
        await down.aclose()


def _subscribed(hub: EventHub, chat_id: str, count: int) -> bool:
    """Whether `count` subscriptions of `chat_id` are registered (they get what is offered)."""
    return len(hub._subs.get(chat_id, ())) == count


async def test_a_seq_never_published_is_skipped_not_waited_for(redis_url: str, store: ChatStore) -> None:
    # A replica that dies between numbering events and publishing them leaves seqs nobody will
    # ever publish. A subscriber (live, on another replica, or replaying later) goes on with the
    # next event at once: the durable poll (an hour here) is not what unblocks it.
    sub_client, pub_client = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    subscriber, publisher = EventHub(sub_client, poll_seconds=3600), EventHub(pub_client)
    chat_id = str(uuid.uuid4())
    live = cast(
        AsyncGenerator[chat_pb2.ChatEvent, None], subscriber.subscribe(chat_id, 0, store.events_between)
    )
    try:
        async with asyncio.timeout(20):
            first = asyncio.create_task(anext(live))
            await wait_until(
                functools.partial(subscriber.follows, chat_id),
                what="the replica to follow the chat",
                timeout=5,
            )
            await publisher.publish(chat_id, [_delta(chat_id, 1), _delta(chat_id, 2)])
            # Seqs 3 and 4 were numbered by a replica that died before publishing them.
            await publisher.publish(chat_id, [_delta(chat_id, 5)])
            seen = [await first]
            while seen[-1].seq < 5:
                seen.append(await anext(live))
            replayed = cast(
                AsyncGenerator[chat_pb2.ChatEvent, None],
                subscriber.subscribe(chat_id, 0, store.events_between),
            )
            try:
                again = [await anext(replayed) for _ in range(3)]
            finally:
                await replayed.aclose()
        # (Consecutive deltas may be merged into one event carrying the later seq.)
        assert "".join(ev.part_delta.text for ev in seen) == "d1d2d5" and seen[-1].seq == 5
        assert [ev.seq for ev in again] == [1, 2, 5]
    finally:
        await live.aclose()
        await subscriber.close()
        await publisher.close()
        await sub_client.aclose()
        await pub_client.aclose()
