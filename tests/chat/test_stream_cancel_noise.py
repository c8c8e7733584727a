"""A client that cancels its StreamChat is ordinary: the server logs no error for it."""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from tests.chat.conftest import Stack, text
from tests.helpers import wait_until


@pytest.mark.timeout(60)
async def test_cancelling_a_stream_logs_no_error(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stub = stack.stub()
    created = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("hello")))
    chat_id = created.chat.id
    # Let the turn end (however it ends: this test is about the streams that follow it).
    await wait_until(
        lambda: stack.chat_of(chat_id),
        until=lambda chat: chat.status in (chat_pb2.CHAT_STATUS_WAITING, chat_pb2.CHAT_STATUS_ERROR),
        what="the chat's turn to end",
        timeout=20,
    )
    caplog.clear()
    hub = stack.chat.api.hub

    for _ in range(3):
        call = stub.StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat_id, after_seq=0))
        first = await call.read()
        assert first.event.seq == 1
        # The stream now follows live events: the server holds a subscription for it.
        await wait_until(lambda: hub.subscribers(chat_id) == 1, what="the server's subscription")
        assert call.cancel()
        assert await call.code() is grpc.StatusCode.CANCELLED
        # The server ends the call and drops the subscription.
        await wait_until(lambda: hub.subscribers(chat_id) == 0, what="the subscription to end")

    # Whatever the ended calls left behind is collected now (an exception nobody retrieved is
    # logged when its task is collected), and the loop runs what that scheduled.
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.05)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(f"{r.name}: {r.getMessage()}\n{r.exc_text or ''}" for r in errors)
