"""Interrupts and lost leases in every phase of the agent loop, steered through gates (no sleeps)."""

from __future__ import annotations

import pytest
from agentplane.chat.v1 import chat_pb2

from services.chat import loop as loop_mod
from services.chat.domain import LeaseLost, NewMessage
from tests.chat.loopkit import (
    Call,
    FakePrompts,
    Gate,
    LoopKit,
    Text,
    Usage,
    finish,
    is_summary_request,
    summary_reply,
)

INTERRUPTED = "The tool call was interrupted before it finished; it may not have run."


def texts(msg: chat_pb2.Message) -> str:
    return "".join(p.text.text for p in msg.parts if p.WhichOneof("part") == "text")


async def test_interrupt_before_the_first_delta_persists_nothing() -> None:
    kit = LoopKit()
    gate = Gate()
    kit.model.add([gate, Text("never sent")])
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await gate.reached()
    kit.interrupt(ctx)
    await finish(task)
    assert kit.store.roles(chat_id) == ["user"]
    assert kit.model.closed_early == 1 and gate.cancelled
    assert kit.store.statuses(chat_id) == ["running", "waiting"]
    assert kit.store.events_of(chat_id, "part_delta") == []


async def test_interrupt_while_generating_keeps_the_partial_text() -> None:
    kit = LoopKit()
    gate = Gate()
    kit.model.add([Text("The answer "), Text("is"), gate, Text(" never finished")])
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await gate.reached()
    kit.interrupt(ctx)
    await finish(task)
    assert kit.store.roles(chat_id) == ["user", "assistant"]
    assert texts(kit.store.messages(chat_id)[-1]) == "The answer is"
    assert kit.model.closed_early == 1
    assert kit.store.statuses(chat_id)[-1] == "waiting"


async def test_interrupt_after_a_streamed_call_closes_it_with_a_synthetic_result() -> None:
    kit = LoopKit()
    gate = Gate()
    kit.model.add([Text("Let me look."), Call("echo", {"x": 1}, id="c1"), gate, Call("echo", id="c2")])
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await gate.reached()
    kit.interrupt(ctx)
    await finish(task)

    assert kit.store.roles(chat_id) == ["user", "assistant", "tool"]
    call_msg, result_msg = kit.store.messages(chat_id)[1:]
    assert [p.tool_call.id for p in call_msg.parts if p.WhichOneof("part") == "tool_call"] == ["c1"]
    [result] = [p.tool_result for p in result_msg.parts]
    assert (result.tool_call_id, result.is_error, result.content) == ("c1", True, INTERRUPTED)
    assert kit.tools.model_calls == []  # the call never ran
    assert kit.store.events_of(chat_id, "tool_call_started") == []

    # The next turn's model sees the call answered.
    kit.model.add([Text("Resumed.")])
    kit.store.send(chat_id, "go on")
    await kit.run(chat_id)
    sent = kit.model.requests[-1].messages
    assert [p.tool_result.content for p in sent[2].parts] == [INTERRUPTED]


async def test_interrupt_while_tools_run_keeps_finished_results() -> None:
    kit = LoopKit()
    slow = kit.tools.gate("write_file")
    kit.model.add(
        [Call("echo", {"fast": True}, id="c1"), Call("write_file", {"path": "a", "content": "x"}, id="c2")],
        [Text("not reached")],
    )
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await slow.reached()
    kit.interrupt(ctx)
    await finish(task)

    assert slow.cancelled and "a" not in kit.tools.files
    results = [p.tool_result for p in kit.store.messages(chat_id)[-1].parts]
    assert [(r.tool_call_id, r.is_error) for r in results] == [("c1", False), ("c2", True)]
    assert results[1].content == INTERRUPTED
    finished = [
        e.tool_call_finished.tool_result.tool_call_id
        for e in kit.store.events_of(chat_id, "tool_call_finished")
    ]
    assert finished == ["c1"]
    assert len(kit.model.requests) == 1  # no step after the interrupt
    assert kit.store.statuses(chat_id)[-1] == "waiting"


async def test_interrupt_between_steps_stops_before_the_next_generation() -> None:
    kit = LoopKit()
    kit.model.add([Call("echo", id="c1")], [Text("not reached")])
    persisted = kit.store.gate("persist", role="tool")
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await persisted.reached()  # the results are stored; the next step has not begun
    kit.interrupt(ctx)
    persisted.open()
    await finish(task)
    assert kit.store.roles(chat_id) == ["user", "assistant", "tool"]
    assert not kit.store.messages(chat_id)[-1].parts[0].tool_result.is_error
    assert len(kit.model.requests) == 1


async def test_interrupt_during_compaction_cancels_the_summary() -> None:
    kit = LoopKit(prompts=FakePrompts(context_limit=1000, threshold_percent=80))
    gate = Gate()
    kit.model.add([gate, *summary_reply("never")])
    history = [
        NewMessage("user", [chat_pb2.ContentPart(text=chat_pb2.TextPart(text="q"))], "alice"),
        NewMessage(
            "assistant",
            [chat_pb2.ContentPart(text=chat_pb2.TextPart(text="a"))],
            "service:chat",
            usage=chat_pb2.Usage(input_tokens=900),
        ),
    ]
    chat_id = kit.create_chat("next", history=history)
    ctx, task = kit.start(chat_id)
    await gate.reached()
    assert is_summary_request(kit.model.requests[0])
    kit.interrupt(ctx)
    await finish(task)
    assert kit.model.closed_early == 1
    assert kit.store.roles(chat_id) == ["user", "assistant", "user"]  # no summary, no reply
    assert kit.store.statuses(chat_id)[-1] == "waiting"

    # The next turn is still over the threshold: it compacts first, then answers.
    kit.model.add(summary_reply("Summary."), [Text("Answer.")])
    kit.store.send(chat_id, "again")
    await kit.run(chat_id)
    assert kit.store.roles(chat_id)[-2:] == ["summary", "assistant"]


async def test_an_interrupt_from_before_the_turn_does_not_stop_it() -> None:
    kit = LoopKit()
    kit.model.add([Text("ran")])
    chat_id = kit.create_chat()
    ctx = kit.context(chat_id)
    kit.interrupt(ctx)  # seen by a renewal that began before the turn started: meant for an earlier turn
    await loop_mod.run_chat(ctx)
    assert texts(kit.store.messages(chat_id)[-1]) == "ran"


async def test_an_interrupt_right_after_the_turn_started_is_honoured() -> None:
    kit = LoopKit()
    started = kit.store.gate("start_run")
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await started.reached()  # committed; its events are being published
    kit.interrupt(ctx)
    started.open()
    await finish(task)
    assert kit.model.requests == []
    assert kit.store.statuses(chat_id) == ["running", "waiting"]


async def test_an_interrupted_turn_still_runs_the_queued_message_next() -> None:
    kit = LoopKit()
    gate = Gate()
    kit.model.add([Text("long "), gate], [Text("short")])
    chat_id = kit.create_chat("first")
    ctx, task = kit.start(chat_id)
    await gate.reached()
    kit.store.queue(chat_id, "urgent")
    kit.interrupt(ctx)
    await finish(task)
    assert [texts(m) for m in kit.store.messages(chat_id)] == ["first", "long ", "urgent", "short"]


async def test_a_lost_lease_while_generating_stops_the_run_without_writing() -> None:
    kit = LoopKit()
    gate = Gate()
    kit.model.add([Text("before"), gate, Text("after"), Usage(output_tokens=2)])
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await gate.reached()
    events_before = list(kit.store.events_of(chat_id))
    kit.store.take_away(chat_id)
    gate.open()
    with pytest.raises(LeaseLost):
        await finish(task)
    assert kit.store.events_of(chat_id) == events_before
    assert kit.store.roles(chat_id) == ["user"]
    del ctx


async def test_a_lost_lease_while_tools_run_stops_the_run_without_writing() -> None:
    kit = LoopKit()
    slow = kit.tools.gate("echo")
    kit.model.add([Call("echo", id="c1")])
    chat_id = kit.create_chat()
    _, task = kit.start(chat_id)
    await slow.reached()
    kit.store.take_away(chat_id)
    slow.open()
    with pytest.raises(LeaseLost):
        await finish(task)
    assert kit.store.roles(chat_id) == ["user", "assistant"]
    assert kit.store.chats[chat_id].status == "pending"  # left for the next worker
