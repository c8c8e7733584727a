"""Tool-call ids: providers that reuse or omit ids cannot collide in toolexec's ledger or in results."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import psycopg
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.chat import tool_ids
from services.simulator.script import Script
from services.toolexec.calls import MAX_TOOL_CALL_ID_LENGTH
from tests.chat.conftest import FAST_CHAT, Stack, read_file, text
from tests.helpers import wait_until


def _calls(*ids: str) -> list[chat_pb2.ContentPart]:
    parts = [chat_pb2.ContentPart(text=chat_pb2.TextPart(text="thinking"))]
    parts += [chat_pb2.ContentPart(tool_call=chat_pb2.ToolCallPart(id=i, name="execute")) for i in ids]
    return parts


def _ids(parts: list[chat_pb2.ContentPart]) -> list[str]:
    return [p.tool_call.id for p in parts if p.WhichOneof("part") == "tool_call"]


def test_ids_within_a_message_are_made_unique() -> None:
    parts = _calls("call_0", "call_0", "", "call_0_2", "x", "")
    assert tool_ids.make_unique(parts) == 3
    # The first of each id keeps it; a repeat never takes an id another call has.
    assert _ids(parts) == ["call_0", "call_0_3", "call_2", "call_0_2", "x", "call_5"]
    unique = _calls("a", "b")
    assert tool_ids.make_unique(unique) == 0 and _ids(unique) == ["a", "b"]


def test_ledger_ids_are_namespaced_and_fit_toolexec() -> None:
    assert tool_ids.MAX_LEDGER_ID_CHARS == MAX_TOOL_CALL_ID_LENGTH
    chat, msg = "c" * 36, "m" * 36
    assert tool_ids.ledger_id(chat, msg, 0, "call_0") == f"{chat}/{msg}/0/call_0"
    assert tool_ids.ledger_id(chat, msg, 0, "call_0") != tool_ids.ledger_id(chat, msg, 1, "call_0")
    long = tool_ids.ledger_id(chat, msg, 12, "x" * 1000)
    assert len(long) == MAX_TOOL_CALL_ID_LENGTH and long.startswith(f"{chat}/{msg}/12/x")


REUSED_IDS = Script.from_data(
    {
        "conversations": [
            {
                "match": "reuse ids",
                "turns": [
                    {
                        "tool_calls": [
                            {"id": "call_0", "name": "execute", "arguments": {"command": "echo one >> log"}}
                        ]
                    },
                    {
                        "tool_calls": [
                            {"id": "call_0", "name": "execute", "arguments": {"command": "echo two >> log"}}
                        ]
                    },
                    # The same command under the same id again: still a new call, so it runs.
                    {
                        "tool_calls": [
                            {"id": "call_0", "name": "execute", "arguments": {"command": "echo two >> log"}}
                        ]
                    },
                    {
                        "tool_calls": [
                            {
                                "id": "call_0",
                                "name": "execute",
                                "arguments": {"command": "echo three >> log"},
                            },
                            {"id": "call_0", "name": "execute", "arguments": {"command": "echo four >> log"}},
                            {"id": "", "name": "execute", "arguments": {"command": "echo five >> log"}},
                        ]
                    },
                    {"text": "Done."},
                ],
            }
        ]
    }
)


async def _ledger_ids(stack: Stack, workspace_id: str) -> list[tuple[str, str]]:
    async with await psycopg.AsyncConnection.connect(stack.settings.require_database_url()) as conn:
        cur = await conn.execute(
            "SELECT tool_call_id, state FROM toolexec_tool_calls"
            " WHERE workspace_id = %s AND tool_name = 'execute' ORDER BY started_at",
            (workspace_id,),
        )
        return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]


async def test_reused_and_missing_ids_all_run(stack: Stack) -> None:
    stack.sim.set_script(REUSED_IDS)
    ws = await stack.workspace()
    resp = await stack.stub().CreateChat(
        chat_service_pb2.CreateChatRequest(content=text("reuse ids"), workspace_id=ws)
    )
    chat_id = resp.chat.id
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)

    log = read_file(os.path.join(stack.workspace_path(ws), "log")) or ""
    lines = log.splitlines()
    # Every call ran once: turn 2's call_0 was not answered with turn 1's recorded result.
    assert lines[:3] == ["one", "two", "two"] and sorted(lines[3:]) == ["five", "four", "three"], lines

    msgs = await stack.messages(chat_id)
    assistants = [m for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT]
    tools = [m for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_TOOL]
    assert [_ids(list(m.parts)) for m in assistants[:3]] == [["call_0"]] * 3
    # Within one message the repeated and the missing id were replaced before the message was stored.
    parallel = _ids(list(assistants[3].parts))
    assert parallel == ["call_0", "call_0_2", "call_2"]
    results = [p.tool_result for p in tools[3].parts]
    assert [r.tool_call_id for r in results] == parallel and not any(r.is_error for r in results)

    # The ledger holds each call under its own namespaced key.
    keys = [key for key, state in await _ledger_ids(stack, ws)]
    assert len(keys) == 6 and len(set(keys)) == 6
    for key in keys:
        chat, message, index, model_id = key.split("/", 3)
        assert chat == chat_id and message in {m.id for m in assistants} and index.isdigit()
        assert model_id.startswith("call_")
    # The model was sent the stored ids: each result answers exactly one call of its message.
    last = [r for r in stack.sim.requests if r.path.endswith("/chat/completions")][-1].body["messages"]
    sent_calls = [c["id"] for m in last if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    assert sent_calls[-3:] == parallel
    assert [m["tool_call_id"] for m in last if m["role"] == "tool"][-3:] == parallel


CRASH = Script.from_data(
    {
        "conversations": [
            {
                "match": "run once",
                "turns": [
                    {
                        "tool_calls": [
                            {
                                "id": "call_0",
                                "name": "execute",
                                # Blocks until the test writes to the FIFO, then leaves a trace.
                                "arguments": {
                                    "command": "read go < gate.fifo && echo run >> runs.log && echo ran"
                                },
                            }
                        ]
                    },
                    {"text": "Finished."},
                ],
            }
        ]
    }
)


def _open_gate(path: str) -> None:
    with open(path, "w") as fifo:  # blocks until the command opened it for reading
        fifo.write("go\n")


async def test_a_call_re_sent_after_a_crash_is_answered_from_the_ledger(stack: Stack) -> None:
    stack.sim.set_script(CRASH)
    ws = await stack.workspace()
    fifo = os.path.join(stack.workspace_path(ws), "gate.fifo")
    os.mkfifo(fifo)
    resp = await stack.stub().CreateChat(
        chat_service_pb2.CreateChatRequest(content=text("run once"), workspace_id=ws)
    )
    chat_id = resp.chat.id
    await wait_until(
        lambda: _ledger_ids(stack, ws),
        until=lambda rows: [s for _, s in rows] == ["started"],
        what="the tool call to be running",
    )
    # The replica running the chat goes away mid-call; the call still finishes in toolexec and its
    # result is recorded in the ledger, but no chat replica stores it.
    await stack.chat.stop()
    await asyncio.to_thread(_open_gate, fifo)
    (key, _), *_ = await wait_until(
        lambda: _ledger_ids(stack, ws),
        until=lambda rows: [s for _, s in rows] == ["completed"],
        what="the interrupted call to be recorded as completed",
    )
    assert key.startswith(f"{chat_id}/") and key.endswith("/0/call_0")

    # Another replica resumes the chat from its history and sends the same call again: same key,
    # so the ledger answers it and the command does not run a second time.
    other = await stack.start_chat_replica(FAST_CHAT)
    stub = stack.stub(chat=other)

    async def status() -> Any:
        return (await stub.GetChat(chat_service_pb2.GetChatRequest(chat_id=chat_id))).chat

    await wait_until(
        status,
        until=lambda c: c.status == chat_pb2.CHAT_STATUS_WAITING,
        what="the resumed chat to finish",
        timeout=30,
    )
    assert read_file(os.path.join(stack.workspace_path(ws), "runs.log")) == "run\n"
    assert await _ledger_ids(stack, ws) == [(key, "completed")]
    msgs = (await stub.ListMessages(chat_service_pb2.ListMessagesRequest(chat_id=chat_id))).messages
    assert [m.role for m in msgs] == [
        chat_pb2.MESSAGE_ROLE_USER,
        chat_pb2.MESSAGE_ROLE_ASSISTANT,
        chat_pb2.MESSAGE_ROLE_TOOL,
        chat_pb2.MESSAGE_ROLE_ASSISTANT,
    ]
    result = msgs[2].parts[0].tool_result
    assert not result.is_error and "ran" in result.content and result.tool_call_id == "call_0"
