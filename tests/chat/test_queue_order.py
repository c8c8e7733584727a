"""Messages run in the order they were sent, also when the turn they were queued behind ended in
ERROR or was stopped: the next message waits behind them (unless it asks to interrupt)."""

from __future__ import annotations

from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.simulator.script import Script
from tests.chat.conftest import Stack, text
from tests.chat.transcript import text_of
from tests.helpers import wait_until


def _script(failing: bool) -> Script:
    """Turn 0 holds at gate "busy" (a tool call: the chat has no workspace, so it gets an error
    result); turn 1 fails once with a refused key when `failing`; every reply names its turn."""
    second: dict[str, object] = {"text": "reply 1"}
    if failing:
        second["fault"] = {"kind": "invalid_key", "times": 1}
    return Script.from_data(
        [
            {
                "turns": [
                    {"tool_calls": [{"name": "echo", "arguments": {}}], "gate": "busy"},
                    second,
                    {"text": "reply 2"},
                    {"text": "reply 3"},
                ]
            }
        ]
    )


def _conversation(messages: list[chat_pb2.Message]) -> list[str]:
    """User and assistant texts in history order (tool messages and tool-call-only replies left out)."""
    return [text_of(m) for m in messages if text_of(m)]


async def test_a_message_queued_before_an_error_runs_before_the_next_one(stack: Stack) -> None:
    stack.sim.set_script(_script(failing=True))
    stub = stack.stub()
    chat = (await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("first")))).chat
    await stack.sim.wait_held("busy")
    queued = await stub.SendMessage(
        chat_service_pb2.SendMessageRequest(chat_id=chat.id, content=text("queued"))
    )
    assert queued.HasField("queued_message")
    await stack.sim.open_gate("busy")
    # The turn's next generation fails: the chat is in ERROR with the message still queued.
    failed = await wait_until(
        lambda: stack.chat_of(chat.id),
        until=lambda c: c.status == chat_pb2.CHAT_STATUS_ERROR,
        what="the turn to fail",
    )
    assert failed.queued_message_count == 1 and failed.last_error.reason == "PROVIDER_AUTH_FAILED"

    later = await stub.SendMessage(
        chat_service_pb2.SendMessageRequest(chat_id=chat.id, content=text("later"))
    )
    # The new message waits behind the queued one, which runs now.
    assert later.HasField("queued_message") and not later.HasField("message")
    assert later.queued_message.position == 1
    assert later.chat.status == chat_pb2.CHAT_STATUS_PENDING and later.chat.queued_message_count == 1
    await stack.wait_status(chat.id, chat_pb2.CHAT_STATUS_WAITING)
    messages = await stack.messages(chat.id)
    assert _conversation(messages) == ["first", "queued", "reply 1", "later", "reply 2"]
    # The queued message kept its id in the history.
    assert queued.queued_message.id in {m.id for m in messages}


async def test_after_a_stop_the_queue_runs_first_unless_the_new_message_interrupts(stack: Stack) -> None:
    stack.sim.set_script(_script(failing=False))
    stub = stack.stub()
    chat = (await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("first")))).chat
    await stack.sim.wait_held("busy")
    for t in ("queued 1", "queued 2"):
        await stub.SendMessage(chat_service_pb2.SendMessageRequest(chat_id=chat.id, content=text(t)))
    await stub.InterruptChat(chat_service_pb2.InterruptChatRequest(chat_id=chat.id))
    await wait_until(
        lambda: stack.chat_of(chat.id),
        until=lambda c: c.status == chat_pb2.CHAT_STATUS_WAITING and c.queued_message_count == 2,
        what="the stopped chat to wait with its two queued messages",
    )
    await stack.sim.open_gate("busy")
    urgent = await stub.SendMessage(
        chat_service_pb2.SendMessageRequest(
            chat_id=chat.id, content=text("urgent"), busy_behavior=chat_pb2.BUSY_BEHAVIOR_INTERRUPT
        )
    )
    # Asked to interrupt: it runs first, the queue after it in order.
    assert urgent.HasField("message")
    await stack.wait_status(chat.id, chat_pb2.CHAT_STATUS_WAITING)
    assert _conversation(await stack.messages(chat.id)) == [
        "first",
        "urgent",
        "reply 1",
        "queued 1",
        "reply 2",
        "queued 2",
        "reply 3",
    ]
