"""StreamChat resumption and WatchChats, against the real stack."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.simulator.script import Script
from tests.chat.conftest import Stack, text, until_watch_is_live
from tests.helpers import wait_until


async def _collect(
    stub: object,
    chat_id: str,
    after: int,
    *,
    stop_after: int | None = None,
    into: list[chat_pb2.ChatEvent] | None = None,
) -> list[chat_pb2.ChatEvent]:
    """Events until the chat waits again (or `stop_after` events, then disconnect), appended to
    `into` as they arrive when given (so a test can watch a stream in progress)."""
    events: list[chat_pb2.ChatEvent] = [] if into is None else into
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


def _streamed(events: list[chat_pb2.ChatEvent]) -> str:
    return "".join(e.part_delta.text for e in events if e.HasField("part_delta"))


async def test_resumed_stream_misses_nothing_and_repeats_nothing(stack: Stack) -> None:
    # The reply holds at a gate after 60 of its 120 words: the resumed stream gets the first
    # half replayed and the second half live, whatever the machine's speed.
    words = [f"w{i}" for i in range(120)]
    stack.sim.set_script(
        Script.from_data(
            [{"turns": [{"text": " ".join(words), "gate": {"name": "half", "after_chunks": 60}}]}]
        )
    )
    stub = stack.stub()
    resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("stream")))
    chat_id = resp.chat.id
    await stack.sim.wait_held("half")
    # The user's message, the chat's creation and its RUNNING status: no delta yet.
    first = await _collect(stub, chat_id, 0, stop_after=3)
    assert [e.seq for e in first] == [1, 2, 3] and not _streamed(first)
    rest: list[chat_pb2.ChatEvent] = []
    resumed = asyncio.create_task(_collect(stub, chat_id, first[-1].seq, into=rest))
    try:
        await wait_until(
            lambda: _streamed(rest),
            until=lambda streamed: streamed == " ".join(words[:60]),
            what="the resumed stream to replay the 60 words streamed before the gate",
        )
        await stack.sim.open_gate("half")
        await asyncio.wait_for(resumed, 30)
    finally:
        resumed.cancel()
    seqs = [e.seq for e in first + rest]
    assert seqs == sorted(set(seqs)), "strictly increasing, no repeats"
    # Everything a fresh subscriber sees from the start is exactly what the two halves saw.
    replay = await _collect(stub, chat_id, 0)
    assert [e.seq for e in replay] == seqs
    chat = await stack.chat_of(chat_id)
    assert seqs[-1] == chat.last_seq
    persisted = [e.message_persisted for e in first + rest if e.HasField("message_persisted")]
    assert persisted[-1].role == chat_pb2.MESSAGE_ROLE_ASSISTANT
    assert _streamed(rest) == persisted[-1].parts[0].text.text == " ".join(words)
    # Deltas are coalesced: far fewer events than the 120 streamed tokens.
    assert sum(1 for e in replay if e.HasField("part_delta")) < 60


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
        probe = await until_watch_is_live(stack, seen)
        theirs = await bob.CreateChat(chat_service_pb2.CreateChatRequest(content=text("bob's")))
        mine = await alice.CreateChat(chat_service_pb2.CreateChatRequest(content=text("alice's")))
        await stack.wait_status(mine.chat.id, chat_pb2.CHAT_STATUS_WAITING)
        await alice.DeleteChat(chat_service_pb2.DeleteChatRequest(chat_id=mine.chat.id))

        await wait_until(
            lambda: any(
                c.kind == chat_pb2.CHAT_CHANGE_KIND_DELETED and c.chat.id == mine.chat.id for c in seen
            ),
            what="WatchChats to report the deletion",
        )
        await stack.wait_status(theirs.chat.id, chat_pb2.CHAT_STATUS_WAITING, user="bob")
        changes = [c for c in seen if c.kind != chat_pb2.CHAT_CHANGE_KIND_BOOKMARK]
        assert {c.chat.id for c in changes} == {probe, mine.chat.id}
        assert any(
            c.kind == chat_pb2.CHAT_CHANGE_KIND_UPSERTED and c.chat.status == chat_pb2.CHAT_STATUS_WAITING
            for c in seen
        )
    finally:
        watch.cancel()
        reader.cancel()
        with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
            await reader
