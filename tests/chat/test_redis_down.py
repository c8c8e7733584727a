"""Redis down: clients of a replica that does not run the chat still get every live event.

The stack uses a Redis of this test's own, which the test stops and starts again (the shared one
is never touched). Replica A runs the chat; replica B runs no workers, so its StreamChat calls get
live events only from other replicas: through Redis, or through the Postgres relay while Redis is
unreachable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterator

import grpc.aio
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.chat.server import ChatServer
from services.common.embedded import EmbeddedRedis, start_redis
from services.common.settings import Settings
from tests.chat.conftest import FAST_CHAT, Stack, start_stack, stop_stack, text
from tests.helpers import make_test_settings, wait_until

WAITING = chat_pb2.CHAT_STATUS_WAITING


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, which it stops and starts (never the session's)."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


def subscribed(chat: ChatServer, chat_id: str) -> Callable[[], bool]:
    """Whether `chat` serves one StreamChat of `chat_id`."""
    hub = chat.api.hub
    return lambda: hub.subscribers(chat_id) == 1


async def turn_as_seen(
    stack: Stack, chats: list[ChatServer], chat_id: str, prompt: str
) -> list[list[chat_pb2.ChatEvent]]:
    """Send `prompt` and return the events each replica's StreamChat delivered for the turn."""
    after = (await stack.chat_of(chat_id)).last_seq
    calls = [
        stack.stub(chat=c).StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat_id, after_seq=after))
        for c in chats
    ]
    for chat in chats:  # every stream follows the chat before the turn starts
        await wait_until(subscribed(chat, chat_id), what="the stream's subscription")

    async def collect(call: grpc.aio.UnaryStreamCall) -> list[chat_pb2.ChatEvent]:
        events: list[chat_pb2.ChatEvent] = []
        try:
            async for item in call:
                events.append(item.event)
                ev = item.event
                if ev.HasField("status_changed") and ev.status_changed.status == WAITING:
                    return events
        finally:
            call.cancel()
        raise AssertionError("the stream ended before the turn did")

    collectors = [asyncio.ensure_future(collect(call)) for call in calls]
    await stack.stub().SendMessage(chat_service_pb2.SendMessageRequest(chat_id=chat_id, content=text(prompt)))
    async with asyncio.timeout(30):
        return list(await asyncio.gather(*collectors))


def check_complete(events: list[chat_pb2.ChatEvent]) -> str:
    """Assert the stream is in order without repeats and its deltas add up to the reply; return it."""
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), f"out of order or repeated: {seqs}"
    replies = [
        e.message_persisted
        for e in events
        if e.HasField("message_persisted") and e.message_persisted.role == chat_pb2.MESSAGE_ROLE_ASSISTANT
    ]
    assert replies, "the stream has no persisted reply"
    streamed = "".join(e.part_delta.text for e in events if e.HasField("part_delta"))
    reply = replies[-1].parts[0].text.text
    assert streamed == reply, f"streamed {len(streamed)} of {len(reply)} characters of the reply"
    return reply


def durable_seqs(events: list[chat_pb2.ChatEvent]) -> list[int]:
    return [e.seq for e in events if e.WhichOneof("event") in {"status_changed", "message_persisted"}]


def redis_lines(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(1 for r in caplog.records if r.name == "services.chat.events" and words in r.getMessage())


@pytest.mark.timeout(120)
async def test_other_replicas_stream_live_events_while_redis_is_down_and_after_it_returns(
    database_url: str,
    keys_dir: str,
    own_redis: EmbeddedRedis,
    make_token: Callable[..., str],
    workspaces_dir: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings: Settings = make_test_settings(
        database_url=database_url, redis_url=own_redis.url, keys_dir=keys_dir
    )
    stack = await start_stack(settings, make_token, workspaces_dir)
    redis = own_redis
    try:
        owner = stack.chat
        other = await stack.start_chat_replica(dataclasses.replace(FAST_CHAT, run_workers=False))
        created = await stack.stub().CreateChat(chat_service_pb2.CreateChatRequest(content=text("hello")))
        chat_id = created.chat.id
        await stack.wait_status(chat_id, WAITING)
        # With Redis: both replicas' clients get the whole reply.
        for seen in await turn_as_seen(stack, [owner, other], chat_id, "first [[words=60]]"):
            check_complete(seen)

        await asyncio.to_thread(redis.stop)
        # A prompt too large for the relay's notifications: it goes as a stub read from Postgres.
        prompt = "second [[words=80]] " + "padding " * 40_000
        on_owner, on_other = await turn_as_seen(stack, [owner, other], chat_id, prompt)
        reply = check_complete(on_owner)
        # The other replica's client got the reply live (its deltas came through Postgres), and
        # every durable event, the large one whole.
        assert check_complete(on_other) == reply
        assert durable_seqs(on_other) == durable_seqs(on_owner)
        prompts = [
            e.message_persisted.parts[0].text.text
            for e in on_other
            if e.HasField("message_persisted") and e.message_persisted.role == chat_pb2.MESSAGE_ROLE_USER
        ]
        assert prompts == [prompt]
        assert owner.api.hub.redis_up is False and other.api.hub.redis_up is False
        # One line per replica for the outage, however many events went by.
        assert redis_lines(caplog, "redis is unreachable") == 2
        noisy = [
            r for r in caplog.records if r.name.startswith("services.chat") and r.levelno >= logging.WARNING
        ]
        assert len(noisy) <= 4, [f"{r.name}: {r.getMessage()}" for r in noisy]

        redis = start_redis(port=own_redis.port)
        await wait_until(
            lambda: owner.api.hub.redis_up and other.api.hub.redis_up, what="both replicas to use Redis again"
        )
        assert redis_lines(caplog, "redis is reachable again") == 2
        for seen in await turn_as_seen(stack, [owner, other], chat_id, "third [[words=60]]"):
            check_complete(seen)
        assert redis_lines(caplog, "redis is unreachable") == 2
    finally:
        await stop_stack(stack)
        if redis is not own_redis:
            redis.stop()
