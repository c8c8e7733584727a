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

from services.chat.events import EventHub
from services.chat.store import ChatStore
from services.common import db
from tests.chat.conftest import eventually


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[ChatStore]:
    pool = await db.create_pool(database_url, max_size=2)

    async def publish(chat_id: str, events: object) -> None:
        return None

    try:
        yield ChatStore(pool, publish)
    finally:
        await pool.close()


async def first_event(hub: EventHub, chat_id: str, store: ChatStore) -> chat_pb2.ChatEvent:
    """The first event a subscription of `chat_id` yields."""
    stream = cast(AsyncGenerator[chat_pb2.ChatEvent, None], hub.subscribe(chat_id, 0, store.events_between))
    try:
        return await anext(stream)
    finally:
        await stream.aclose()


async def _followed(hub: EventHub, chat_id: str) -> bool:
    """Whether the replica's reader follows `chat_id`."""
    return chat_id in hub._positions


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
                await eventually(functools.partial(_followed, subscriber, cid), within=5)
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
