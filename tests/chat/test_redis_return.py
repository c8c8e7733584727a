"""A replica coming back to Redis must not make other replicas' subscribers lose events it relayed.

While Redis is away a replica relays its events through Postgres NOTIFY; once back, it publishes
through Redis pub/sub again. The two paths are not ordered: a subscriber on another replica can
get a later event through Redis before an earlier one still on its way through the relay, and a
gap in the live sequence is filled from Postgres, which holds durable events only: a streaming
event (a reply's delta) that went through the relay alone was skipped, and dropped when it came.
Found by the fault suite (tests/faults/test_datastores.py: a live follower missed the first delta
of a reply across a Redis stop). Now a replica first appends to the Redis buffer what it published
while Redis was away, and a subscriber fills a gap from the buffer too.

Real Redis (a server of this test's own, stopped and started) and real Postgres NOTIFYs; the
relay of the replica that comes back is held (its only pool connection taken) so that its events
are still on their way when it publishes through Redis again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from agentplane.chat.v1 import chat_pb2

from services.chat.events import EventHub
from services.chat.notify import Notifier
from services.chat.relay import RELAY_CHANNEL, PgRelay
from services.common import db
from services.common.embedded import EmbeddedRedis, start_redis
from tests.helpers import wait_until

CHAT = "00000000-0000-0000-0000-0000000000c1"


def _delta(seq: int) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        seq=seq, chat_id=CHAT, part_delta=chat_pb2.PartDelta(message_id="m", text=f"d{seq} ")
    )


async def _no_durable_events(chat_id: str, after: int, before: int | None) -> list[chat_pb2.ChatEvent]:
    return []  # every event of this test is a delta: Postgres holds none of them


@pytest.fixture
async def redis_server() -> AsyncIterator[list[EmbeddedRedis]]:
    """A redis-server of this test's own (a list: the test replaces it when it starts it again)."""
    servers = [start_redis()]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


async def test_events_relayed_before_a_return_to_redis_reach_other_replicas(
    database_url: str, redis_server: list[EmbeddedRedis]
) -> None:
    redis = redis_server[0]
    # The returning replica's relay has a pool of one connection, which the test can hold.
    relay_pool = await db.create_pool(database_url, autocommit=True, max_size=1, min_size=1)
    other_pool = await db.create_pool(database_url, autocommit=True)
    returning = EventHub(db.create_redis(redis.url), relay=PgRelay(relay_pool), probe_seconds=0.05)
    other = EventHub(db.create_redis(redis.url), relay=PgRelay(other_pool), probe_seconds=0.05)
    notifier = Notifier(database_url, [RELAY_CHANNEL])
    notifier.add(RELAY_CHANNEL, other.relayed)
    await notifier.start()
    got: list[int] = []

    async def follow() -> None:
        async for ev in other.subscribe(CHAT, 0, _no_durable_events):
            got.append(ev.seq)

    follower = asyncio.create_task(follow())
    try:
        await wait_until(lambda: other.follows(CHAT), what="the subscription to follow the chat on Redis")
        await returning.publish_many([(CHAT, [_delta(1)])])
        await wait_until(lambda: list(got), until=lambda seqs: seqs == [1], what="seq 1 through Redis")

        redis.stop()
        await returning.publish_many([(CHAT, [_delta(2)])])  # fails: Redis is down, so relayed
        await wait_until(lambda: list(got), until=lambda seqs: seqs == [1, 2], what="seq 2 through the relay")
        await wait_until(lambda: not other.redis_up, what="the other replica to notice Redis is down")

        async with relay_pool.connection():  # the returning replica's relay waits for this
            await returning.publish_many([(CHAT, [_delta(3)])])  # relayed, held on its way
            redis_server.append(start_redis(port=redis.port))
            await wait_until(
                lambda: returning.redis_up and other.redis_up and other.follows(CHAT),
                what="both replicas back on Redis, the subscription following the chat again",
            )
            await returning.publish_many([(CHAT, [_delta(4)])])  # through Redis: arrives first
            await wait_until(lambda: 4 in got, what="seq 4 through Redis")
            assert got == [1, 2, 3, 4], "seq 3, still on its way through the relay, was skipped"
        # The relay delivers 3 and 4 now: nothing twice.
        relay = returning._relay
        assert relay is not None
        await wait_until(lambda: relay.sent >= 2, what="the held relay to send seqs 3 and 4")
        await returning.publish_many([(CHAT, [_delta(5)])])
        await wait_until(lambda: 5 in got, what="seq 5")
        assert got == [1, 2, 3, 4, 5]
    finally:
        follower.cancel()
        with contextlib.suppress(BaseException):
            await follower
        await notifier.stop()
        await returning.close()
        await other.close()
        await relay_pool.close()
        await other_pool.close()
