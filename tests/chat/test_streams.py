"""StreamChat resumption and WatchChats, against the real stack."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.common.settings import Settings
from tests.chat.conftest import Stack, eventually, start_stack, stop_stack, text


async def _collect(
    stub: object, chat_id: str, after: int, *, stop_after: int | None = None
) -> list[chat_pb2.ChatEvent]:
    """Events until the chat waits again (or `stop_after` events, then disconnect)."""
    events: list[chat_pb2.ChatEvent] = []
    call = stub.StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat_id, after_seq=after))  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(30):
            async for item in call:
                events.append(item.event)
                if stop_after is not None and len(events) >= stop_after:
                    break
                ev = item.event
                if ev.HasField("status_changed") and ev.status_changed.status == chat_pb2.CHAT_STATUS_WAITING:
                    break
    finally:
        call.cancel()
    return events


async def test_resumed_stream_misses_nothing_and_repeats_nothing(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str
) -> None:
    stack = await start_stack(settings, make_token, workspaces_dir, token_delay_ms=5)
    try:
        stub = stack.stub()
        resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("stream [[words=120]]")))
        chat_id = resp.chat.id
        first = await _collect(stub, chat_id, 0, stop_after=6)
        assert len(first) == 6
        rest = await _collect(stub, chat_id, first[-1].seq)
        seqs = [e.seq for e in first + rest]
        assert seqs == sorted(set(seqs)), "strictly increasing, no repeats"
        # Everything a fresh subscriber sees from the start is exactly what the two halves saw.
        replay = await _collect(stub, chat_id, 0)
        assert [e.seq for e in replay] == seqs
        chat = await stack.chat_of(chat_id)
        assert seqs[-1] == chat.last_seq
        streamed = "".join(e.part_delta.text for e in first + rest if e.HasField("part_delta"))
        persisted = [e.message_persisted for e in first + rest if e.HasField("message_persisted")]
        assert persisted[-1].role == chat_pb2.MESSAGE_ROLE_ASSISTANT
        assert streamed == persisted[-1].parts[0].text.text
        # Deltas are coalesced: far fewer events than the 120 streamed tokens.
        assert sum(1 for e in replay if e.HasField("part_delta")) < 60
    finally:
        await stop_stack(stack)


async def test_stream_of_finished_chat_replays_history(stack: Stack) -> None:
    stub = stack.stub()
    resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("hello")))
    await stack.wait_status(resp.chat.id, chat_pb2.CHAT_STATUS_WAITING)
    events = await _collect(stub, resp.chat.id, 0)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "message_persisted" and kinds[-1] == "status_changed"
    assert kinds.count("message_persisted") == 2


async def test_stream_rejects_bad_after_seq_and_other_owners(stack: Stack) -> None:
    stub = stack.stub()
    resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("hello")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub, resp.chat.id, 10_000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "after_seq" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stack.stub("bob"), resp.chat.id, 0)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_chats_sees_own_changes_only(stack: Stack) -> None:
    alice, bob = stack.stub("alice"), stack.stub("bob")
    watch = alice.WatchChats(chat_service_pb2.WatchChatsRequest())
    seen: list[chat_service_pb2.WatchChatsResponse] = []

    async def read() -> None:
        async for change in watch:
            seen.append(change)

    reader = asyncio.create_task(read())
    try:
        await bob.CreateChat(chat_service_pb2.CreateChatRequest(content=text("bob's")))
        mine = await alice.CreateChat(chat_service_pb2.CreateChatRequest(content=text("alice's")))
        await stack.wait_status(mine.chat.id, chat_pb2.CHAT_STATUS_WAITING)
        await alice.DeleteChat(chat_service_pb2.DeleteChatRequest(chat_id=mine.chat.id))

        async def deleted_seen() -> bool:
            return any(c.kind == chat_pb2.CHAT_CHANGE_KIND_DELETED for c in seen)

        await eventually(deleted_seen, within=10)
        assert all(c.chat.id == mine.chat.id for c in seen)
        assert any(
            c.kind == chat_pb2.CHAT_CHANGE_KIND_UPSERTED and c.chat.status == chat_pb2.CHAT_STATUS_WAITING
            for c in seen
        )
    finally:
        watch.cancel()
        reader.cancel()
        with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
            await reader
