"""The agent loop end to end: simulator, config, inference, toolexec and chat, all real."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.common.settings import Settings
from services.simulator.script import Script
from tests.chat.conftest import Stack, read_file, start_stack, stop_stack, text, write_file
from tests.helpers import wait_until

BUILD_SCRIPT = Script.from_data(
    {
        "conversations": [
            {
                "match": "build the greeter",
                "turns": [
                    {
                        "text": "I'll write the script.",
                        "tool_calls": [
                            {
                                "name": "write_file",
                                "arguments": {"path": "hello.py", "content": "print('hi from the agent')\n"},
                            },
                            {"name": "no_such_tool", "arguments": {}},
                            {"name": "write_file", "arguments": '{"path": "broken.txt", '},
                        ],
                    },
                    {
                        "tool_calls": [
                            {"name": "execute", "arguments": {"command": "python3 hello.py > out.txt"}}
                        ]
                    },
                    {"text": "Done: hello.py prints a greeting."},
                ],
            }
        ]
    }
)


async def test_multi_step_run_writes_and_runs_files(stack: Stack) -> None:
    stack.sim.set_script(BUILD_SCRIPT)
    ws = await stack.workspace()
    write_file(os.path.join(stack.workspace_path(ws), "AGENTS.md"), "Always answer in haiku.")
    resp = await stack.stub().CreateChat(
        chat_service_pb2.CreateChatRequest(content=text("please build the greeter"), workspace_id=ws)
    )
    chat_id = resp.chat.id
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)

    root = stack.workspace_path(ws)
    assert read_file(os.path.join(root, "out.txt")) == "hi from the agent\n"
    assert read_file(os.path.join(root, "broken.txt")) is None

    msgs = await stack.messages(chat_id)
    roles = [m.role for m in msgs]
    assert roles == [
        chat_pb2.MESSAGE_ROLE_USER,
        chat_pb2.MESSAGE_ROLE_ASSISTANT,
        chat_pb2.MESSAGE_ROLE_TOOL,
        chat_pb2.MESSAGE_ROLE_ASSISTANT,
        chat_pb2.MESSAGE_ROLE_TOOL,
        chat_pb2.MESSAGE_ROLE_ASSISTANT,
    ]
    first_results = [p.tool_result for p in msgs[2].parts]
    # Results in call order; the model's mistakes become error results it can correct.
    assert [r.tool_name for r in first_results] == ["write_file", "no_such_tool", "write_file"]
    assert not first_results[0].is_error
    assert first_results[1].is_error and "Unknown tool 'no_such_tool'" in first_results[1].content
    assert first_results[2].is_error and "not valid JSON" in first_results[2].content
    assert msgs[1].usage.output_tokens > 0 and msgs[1].model_config_id == stack.model_config_id
    assert msgs[-1].parts[0].text.text == "Done: hello.py prints a greeting."

    requests = [r for r in stack.sim.requests if r.path.endswith("/chat/completions")]
    assert len(requests) == 3
    system = requests[0].body["messages"][0]
    assert system["role"] == "system" and "Always answer in haiku." in system["content"]
    assert {t["function"]["name"] for t in requests[0].body["tools"]} >= {
        "read_file",
        "write_file",
        "execute",
    }
    # The follow-up request carries all three results, in order, answering the right calls.
    tool_msgs = [m for m in requests[1].body["messages"] if m["role"] == "tool"]
    assert len(tool_msgs) == 3
    chat = await stack.chat_of(chat_id)
    assert chat.usage.output_tokens == sum(m.usage.output_tokens for m in msgs)


async def test_step_limit_ends_the_turn_with_a_message(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str
) -> None:
    from dataclasses import replace

    from tests.chat.conftest import FAST_CHAT

    looping = Script.from_data(
        {
            "conversations": [
                {
                    "match": "loop forever",
                    "turns": [
                        {"tool_calls": [{"name": "read_file", "arguments": {"path": "x.txt"}}]}
                        for _ in range(10)
                    ],
                }
            ]
        }
    )
    stack = await start_stack(
        settings, make_token, workspaces_dir, chat_settings=replace(FAST_CHAT, step_limit=3), script=looping
    )
    try:
        ws = await stack.workspace()
        resp = await stack.stub().CreateChat(
            chat_service_pb2.CreateChatRequest(content=text("loop forever"), workspace_id=ws)
        )
        await stack.wait_status(resp.chat.id, chat_pb2.CHAT_STATUS_WAITING)
        msgs = await stack.messages(resp.chat.id)
        assert (
            sum(1 for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT and m.usage.output_tokens) == 3
        )
        assert "step limit" in msgs[-1].parts[0].text.text
    finally:
        await stop_stack(stack)


async def test_provider_failure_puts_chat_in_error_and_a_new_message_resumes(stack: Stack) -> None:
    stack.sim.set_script(
        Script.from_data(
            {
                "conversations": [
                    {
                        "match": "fail please",
                        "turns": [{"text": "never", "fault": {"kind": "invalid_key", "times": 100}}],
                    },
                    {"turns": [{"text": "Recovered."}]},
                ]
            }
        )
    )
    stub = stack.stub()
    resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("fail please")))
    await stack.wait_status(resp.chat.id, chat_pb2.CHAT_STATUS_ERROR)
    chat = await stack.chat_of(resp.chat.id)
    assert chat.last_error.reason == "PROVIDER_AUTH_FAILED"
    assert chat.last_error.message
    stack.sim.set_script(Script.from_data({"conversations": [{"turns": [{"text": "Recovered."}]}]}))
    await stub.SendMessage(chat_service_pb2.SendMessageRequest(chat_id=resp.chat.id, content=text("again")))
    await stack.wait_status(resp.chat.id, chat_pb2.CHAT_STATUS_WAITING)
    chat = await stack.chat_of(resp.chat.id)
    assert not chat.HasField("last_error")
    msgs = await stack.messages(resp.chat.id)
    assert msgs[-1].parts[0].text.text == "Recovered."


async def test_queued_messages_run_in_order(stack: Stack) -> None:
    # The first reply holds at a gate, so the chat is busy while the three messages below are
    # queued and listed; the queued ones get short replies once the gate opens.
    long_reply = " ".join(f"word{i}" for i in range(60))
    stack.sim.set_script(
        Script.from_data(
            {
                "conversations": [
                    {
                        "match": "first",
                        "turns": [
                            {"text": long_reply, "gate": "first"},
                            {"text": "Reply 0."},
                            {"text": "Reply 1."},
                            {"text": "Reply 2."},
                        ],
                    }
                ]
            }
        )
    )
    stub = stack.stub()
    resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("first")))
    chat_id = resp.chat.id
    await stack.sim.wait_held("first")
    queued_ids = []
    for i in range(3):
        r = await stub.SendMessage(
            chat_service_pb2.SendMessageRequest(chat_id=chat_id, content=text(f"queued {i}"))
        )
        assert r.HasField("queued_message") and not r.HasField("message")
        queued_ids.append(r.queued_message.id)
    listed = await stub.ListQueuedMessages(chat_service_pb2.ListQueuedMessagesRequest(chat_id=chat_id))
    assert [q.id for q in listed.queued_messages] == queued_ids
    assert [q.position for q in listed.queued_messages] == [1, 2, 3]
    await stack.sim.open_gate("first")
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    msgs = await stack.messages(chat_id)
    users = [m for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_USER]
    assert [m.parts[0].text.text for m in users] == ["first", "queued 0", "queued 1", "queued 2"]
    # Queued messages keep their ids in the history; every one got its own reply.
    assert [m.id for m in users[1:]] == queued_ids
    assert [m.role for m in msgs] == [chat_pb2.MESSAGE_ROLE_USER, chat_pb2.MESSAGE_ROLE_ASSISTANT] * 4
    replies = [m.parts[0].text.text for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT]
    assert replies == [long_reply, "Reply 0.", "Reply 1.", "Reply 2."]


async def test_idempotent_send_and_create(stack: Stack) -> None:
    stub = stack.stub()
    a = await stub.CreateChat(chat_service_pb2.CreateChatRequest(request_id="c-1", content=text("hi")))
    b = await stub.CreateChat(chat_service_pb2.CreateChatRequest(request_id="c-1", content=text("hi")))
    assert a.chat.id == b.chat.id and a.message.id == b.message.id
    await stack.wait_status(a.chat.id, chat_pb2.CHAT_STATUS_WAITING)
    req = chat_service_pb2.SendMessageRequest(chat_id=a.chat.id, request_id="s-1", content=text("once"))
    first, second = await asyncio.gather(stub.SendMessage(req), stub.SendMessage(req))
    ids = {r.message.id or r.queued_message.id for r in (first, second)}
    assert len(ids) == 1
    # One answer was built by the statement that stored the message, the other read it back.
    assert first.message == second.message
    await stack.wait_status(a.chat.id, chat_pb2.CHAT_STATUS_WAITING)
    again = await stub.SendMessage(req)
    assert again.message == first.message
    msgs = await stack.messages(a.chat.id)
    assert [m.parts[0].text.text for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_USER] == ["hi", "once"]
    listed = await stub.ListChats(chat_service_pb2.ListChatsRequest())
    assert [c.id for c in listed.chats] == [a.chat.id]


def _long_reply_held_after(words: int, *later: str) -> tuple[str, Script]:
    """A 400-word first reply that holds at gate "long" after `words` words, then `later` replies."""
    reply = " ".join(f"word{i}" for i in range(400))
    turns = [{"text": reply, "gate": {"name": "long", "after_chunks": words}}]
    return reply, Script.from_data([{"turns": turns + [{"text": t} for t in later]}])


async def _stream_until_words(stack: Stack, chat_id: str, words: int) -> str:
    """The chat's streamed text once it holds `words` words (read from StreamChat)."""
    stream = stack.stub().StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat_id))
    seen = ""
    try:
        async with asyncio.timeout(20):
            async for item in stream:
                if item.event.HasField("part_delta"):
                    seen += item.event.part_delta.text
                    if len(seen.split()) >= words:
                        return seen
    finally:
        stream.cancel()
    raise AssertionError(f"the stream ended after {seen!r}")


async def test_interrupt_keeps_partial_text(stack: Stack) -> None:
    reply, script = _long_reply_held_after(5)
    stack.sim.set_script(script)
    stub = stack.stub()
    resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("talk")))
    chat_id = resp.chat.id
    # The model is held after 5 words: once the chat has streamed them, interrupt it.
    seen = await _stream_until_words(stack, chat_id, 5)
    assert seen == " ".join(reply.split()[:5])
    r = await stub.InterruptChat(chat_service_pb2.InterruptChatRequest(chat_id=chat_id))
    assert r.chat.status == chat_pb2.CHAT_STATUS_WAITING
    msgs = await wait_until(
        lambda: stack.messages(chat_id),
        until=lambda msgs: len(msgs) == 2,
        what="the partial reply to be persisted",
    )
    assert msgs[1].parts[0].text.text == seen
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    # The provider stream was cancelled while held, not read to the end.
    await stack.sim.wait_until(lambda: stack.sim.client_closed_streams == 1)
    assert stack.sim.gate("long").held == 0 and not stack.sim.streams[-1].completed


async def test_interrupt_during_tool_call_gives_synthetic_result(stack: Stack) -> None:
    stack.sim.set_script(
        Script.from_data(
            {
                "conversations": [
                    {
                        "match": "wait a while",
                        "turns": [
                            {"tool_calls": [{"name": "execute", "arguments": {"command": "sleep 20"}}]},
                            {"text": "after"},
                        ],
                    }
                ]
            }
        )
    )
    ws = await stack.workspace()
    stub = stack.stub()
    resp = await stub.CreateChat(
        chat_service_pb2.CreateChatRequest(content=text("wait a while"), workspace_id=ws)
    )
    chat_id = resp.chat.id
    stream = stub.StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat_id))
    async for item in stream:
        if item.event.HasField("tool_call_started"):
            break
    stream.cancel()
    await stub.InterruptChat(chat_service_pb2.InterruptChatRequest(chat_id=chat_id))

    msgs = await wait_until(
        lambda: stack.messages(chat_id),
        until=lambda msgs: len(msgs) == 3,
        what="the interrupted tool call's synthetic result",
    )
    result = msgs[2].parts[0].tool_result
    assert result.is_error and "interrupted" in result.content
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    # A new message runs from a consistent history: the model saw the synthetic result.
    await stub.SendMessage(chat_service_pb2.SendMessageRequest(chat_id=chat_id, content=text("go on")))
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    last = stack.sim.requests[-1].body["messages"]
    assert any(m["role"] == "tool" and "interrupted" in str(m["content"]) for m in last)


async def test_send_with_interrupt_runs_the_new_message_next(stack: Stack) -> None:
    # The first reply holds after 3 words (so its partial text is kept and the later requests
    # carry one more assistant message: the script's next turns answer them).
    _, script = _long_reply_held_after(3, "Urgent answered.", "Queued answered.")
    stack.sim.set_script(script)
    stub = stack.stub()
    resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("long")))
    chat_id = resp.chat.id
    partial = await _stream_until_words(stack, chat_id, 3)
    await stub.SendMessage(
        chat_service_pb2.SendMessageRequest(chat_id=chat_id, content=text("queued normally"))
    )
    await stub.SendMessage(
        chat_service_pb2.SendMessageRequest(
            chat_id=chat_id, content=text("urgent"), busy_behavior=chat_pb2.BUSY_BEHAVIOR_INTERRUPT
        )
    )
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING, within=30)
    msgs = await stack.messages(chat_id)
    users = [m.parts[0].text.text for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_USER]
    assert users == ["long", "urgent", "queued normally"]
    replies = [m.parts[0].text.text for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT]
    assert replies == [partial, "Urgent answered.", "Queued answered."]
