"""EditMessage and CompactChat made idempotent by request_id, against the real stack."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from agentplane.chat.v1 import chat_pb2
from agentplane.chat.v1 import chat_service_pb2 as cs

from services.common import rpc_errors
from services.simulator.script import Script
from tests.chat.conftest import FAST_CHAT, Stack, text


def _summary_requests(stack: Stack) -> int:
    """Generations asked to summarize (the summary prompt is the last user message)."""
    return sum(
        1
        for r in stack.sim.requests
        if r.path.endswith("/chat/completions")
        and "Summarize the conversation" in str(r.body["messages"][-1])
    )


async def test_repeated_edit_changes_nothing(stack: Stack) -> None:
    stub = stack.stub()
    created = await stub.CreateChat(cs.CreateChatRequest(content=text("first [[words=2]]")))
    chat_id = created.chat.id
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    edit = cs.EditMessageRequest(
        chat_id=chat_id, message_id=created.message.id, content=text("edited [[words=2]]"), request_id="e-1"
    )
    first, second = await asyncio.gather(stub.EditMessage(edit), stub.EditMessage(edit))
    assert first.message.id == second.message.id
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    generations = len(stack.sim.requests)
    again = await stub.EditMessage(edit)
    # The first edit's message, the chat as it is now, and no new run.
    assert again.message == first.message and again.chat.status == chat_pb2.CHAT_STATUS_WAITING
    msgs = await stack.messages(chat_id)
    assert [m.role for m in msgs] == [chat_pb2.MESSAGE_ROLE_USER, chat_pb2.MESSAGE_ROLE_ASSISTANT]
    assert msgs[0].id == first.message.id
    assert len(stack.sim.requests) == generations
    # A key is the user's: used for an edit of another chat it is refused.
    other = await stub.CreateChat(cs.CreateChatRequest(content=text("other")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EditMessage(
            cs.EditMessageRequest(
                chat_id=other.chat.id, message_id=other.message.id, content=text("x"), request_id="e-1"
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in (
        err.value.details() or ""
    )


SUMMARY_HELD = Script.from_data(
    # The summary request carries one assistant message, so the simulator answers with turn 1.
    {"conversations": [{"turns": [{"text": "unused"}, {"text": "SUMMARY: 42", "gate": "summary"}]}]}
)


async def test_repeated_compaction_makes_one_model_call(stack: Stack) -> None:
    stub = stack.stub()
    chat = (await stub.CreateChat(cs.CreateChatRequest(content=text("remember 42")))).chat
    await stack.wait_status(chat.id, chat_pb2.CHAT_STATUS_WAITING)
    stack.sim.set_script(SUMMARY_HELD)
    request = cs.CompactChatRequest(chat_id=chat.id, request_id="compact-1")

    # The first call's caller goes away while the summary is being generated (a client timeout):
    # the compaction goes on, and a repeat on the same replica waits for it instead of starting
    # another generation.
    first = stub.CompactChat(request)
    await stack.sim.wait_held("summary")
    first.cancel()
    repeat = asyncio.ensure_future(stub.CompactChat(request))
    # On another replica the key says it is running, but not where: ABORTED, repeat later.
    other = stack.stub(chat=await stack.start_chat_replica(FAST_CHAT))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await other.CompactChat(request)
    assert err.value.code() == grpc.StatusCode.ABORTED
    info = rpc_errors.error_info(err.value)
    assert info is not None and info[0] == "COMPACTION_IN_PROGRESS" and info[1]["chat_id"] == chat.id
    assert not repeat.done()

    await stack.sim.open_gate("summary")
    summary = (await repeat).summary
    assert summary.role == chat_pb2.MESSAGE_ROLE_SUMMARY and summary.parts[0].text.text == "SUMMARY: 42"
    assert _summary_requests(stack) == 1
    # Later repeats, on either replica, answer from the key: the same summary, no model call.
    for s in (stub, other):
        again = await s.CompactChat(request)
        assert again.summary == summary and again.chat.id == chat.id
    assert _summary_requests(stack) == 1
    summaries = [m for m in await stack.messages(chat.id) if m.role == chat_pb2.MESSAGE_ROLE_SUMMARY]
    assert [m.id for m in summaries] == [summary.id]


async def test_failed_compaction_keeps_no_key(stack: Stack) -> None:
    stub = stack.stub()
    stack.sim.set_script(Script.from_data({"conversations": [{"turns": [{"text": "held", "gate": "busy"}]}]}))
    chat = (await stub.CreateChat(cs.CreateChatRequest(content=text("busy")))).chat
    await stack.sim.wait_held("busy")
    request = cs.CompactChatRequest(chat_id=chat.id, request_id="compact-2")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CompactChat(request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "CHAT_BUSY" in str(
        rpc_errors.error_info(err.value)
    )
    await stack.sim.open_gate("busy")
    await stack.wait_status(chat.id, chat_pb2.CHAT_STATUS_WAITING)
    # Nothing was done the first time, so the repeat compacts now.
    stack.sim.set_script(None)
    done = await stub.CompactChat(request)
    assert done.summary.role == chat_pb2.MESSAGE_ROLE_SUMMARY
    assert (await stub.CompactChat(request)).summary.id == done.summary.id
