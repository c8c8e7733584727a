"""Replies that are never persisted (services/chat/loop_replies.py), against the loop's in-memory
fakes: a provider stream broken mid-reply is discarded and generated again, a failure mid-reply
discards it before the chat errors, and a run that finds a reply its predecessor abandoned
announces it before answering."""

from __future__ import annotations

import asyncio

from services.chat.loop import ModelError
from services.chat.loop_replies import RUN_ABANDONED, STREAM_INTERRUPTED
from tests.chat.loopkit import Call, Fail, Gate, Item, LoopKit, Text, Usage, finish
from tests.chat.transcript import Transcript, streamed_text, text_of


def _kinds(kit: LoopKit, chat_id: str) -> list[str]:
    return [str(e.WhichOneof("event")) for e in kit.store.events_of(chat_id)]


async def test_a_stream_broken_mid_reply_is_discarded_and_generated_again() -> None:
    kit = LoopKit()
    kit.model.add(
        [Text("The answer is"), Text(" forty"), Fail(STREAM_INTERRUPTED, "the provider's stream broke")],
        [Text("The answer is 42."), Usage(output_tokens=5)],
    )
    chat_id = kit.create_chat("what is the answer?")
    await kit.run(chat_id)

    assert kit.store.roles(chat_id) == ["user", "assistant"]
    reply = kit.store.messages(chat_id)[-1]
    assert text_of(reply) == "The answer is 42."
    events = kit.store.events_of(chat_id)
    [discarded] = [e.reply_discarded for e in events if e.HasField("reply_discarded")]
    assert discarded.reason == STREAM_INTERRUPTED and discarded.retrying
    first_deltas = {e.part_delta.message_id for e in events if e.HasField("part_delta")} - {reply.id}
    assert first_deltas == {discarded.message_id}, "the discarded reply is the one that broke"
    # The retry is announced after the discard, then the new reply streams.
    kinds = _kinds(kit, chat_id)
    at = kinds.index("reply_discarded")
    assert kinds[at + 1] == "retry_scheduled"
    retry = events[at + 1].retry_scheduled
    assert retry.reason == STREAM_INTERRUPTED and retry.attempt == 2
    # A client that honours the discard shows exactly the persisted reply; one that ignores it
    # would show the broken start too.
    shown = Transcript.of(events)
    assert shown.shown() == [text_of(reply)] and not shown.unpersisted()
    assert streamed_text(events) == "The answer is forty" + text_of(reply)
    assert kit.store.chats[chat_id].streaming is None
    assert kit.store.statuses(chat_id) == ["running", "waiting"]


async def test_a_stream_that_keeps_breaking_ends_in_error_with_every_attempt_discarded() -> None:
    kit = LoopKit()
    broken: list[Item] = [Text("partial"), Fail(STREAM_INTERRUPTED, "the provider's stream broke")]
    kit.model.add(broken, broken, broken)  # stream_retries = 2: three attempts
    chat_id = kit.create_chat()
    await kit.run(chat_id)

    assert kit.store.roles(chat_id) == ["user"]
    assert kit.store.chats[chat_id].status == "error"
    events = kit.store.events_of(chat_id)
    discards = [e.reply_discarded for e in events if e.HasField("reply_discarded")]
    assert [d.retrying for d in discards] == [True, True, False]
    assert len({d.message_id for d in discards}) == 3
    assert [e.retry_scheduled.attempt for e in events if e.HasField("retry_scheduled")] == [2, 3]
    assert Transcript.of(events).shown() == []
    assert _kinds(kit, chat_id)[-2:] == ["error", "status_changed"]
    assert kit.store.chats[chat_id].streaming is None


async def test_another_failure_mid_reply_discards_it_and_is_not_retried() -> None:
    kit = LoopKit()
    kit.model.add([Text("I will"), Fail("CONTENT_FILTERED", "the provider's filter stopped the reply")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)

    assert kit.store.chats[chat_id].status == "error"
    events = kit.store.events_of(chat_id)
    [discarded] = [e.reply_discarded for e in events if e.HasField("reply_discarded")]
    assert discarded.reason == "CONTENT_FILTERED" and not discarded.retrying
    assert not any(e.HasField("retry_scheduled") for e in events)
    assert len(kit.model.requests) == 1


async def test_a_failure_before_any_delta_discards_nothing() -> None:
    kit = LoopKit()
    kit.model.add([Fail("RATE_LIMITED", "slow down")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    assert "reply_discarded" not in _kinds(kit, chat_id)
    assert kit.store.chats[chat_id].status == "error"


async def test_an_interrupt_while_waiting_to_retry_ends_the_turn() -> None:
    kit = LoopKit()
    kit.config.stream_retry_delay_ms = 60_000  # the interrupt, not the delay, ends the wait
    kit.model.add([Text("partial"), Fail(STREAM_INTERRUPTED, "broke")])
    announced = kit.store.gate("discard_reply")
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await announced.reached()  # the discard and the retry notice are written
    kit.interrupt(ctx)
    announced.open()
    await finish(task)
    assert "retry_scheduled" in _kinds(kit, chat_id)
    assert kit.store.roles(chat_id) == ["user"]
    assert kit.store.statuses(chat_id) == ["running", "waiting"]
    assert len(kit.model.requests) == 1


async def test_a_run_announces_the_reply_its_predecessor_abandoned() -> None:
    kit = LoopKit()
    gate = Gate("mid-reply")
    kit.model.add([Text("Half of an ans"), gate, Text("wer.")])
    chat_id = kit.create_chat()
    _, task = kit.start(chat_id)
    await gate.reached()
    # The replica dies mid-reply (its task is gone, nothing more is written), the sweep takes
    # the chat back, and another run continues it.
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    kit.store.take_away(chat_id)
    abandoned = kit.store.chats[chat_id].streaming
    assert abandoned is not None
    kit.model.add([Text("A whole answer."), Usage(output_tokens=3)])
    await kit.run(chat_id)

    reply = kit.store.messages(chat_id)[-1]
    assert kit.store.roles(chat_id) == ["user", "assistant"] and text_of(reply) == "A whole answer."
    events = kit.store.events_of(chat_id)
    kinds = _kinds(kit, chat_id)
    # The second run's start, then the discard, before its first delta.
    second_start = [i for i, e in enumerate(events) if e.HasField("status_changed")][1]
    assert kinds[second_start + 1] == "reply_discarded"
    discarded = events[second_start + 1].reply_discarded
    assert discarded.message_id == abandoned and discarded.reason == RUN_ABANDONED and discarded.retrying
    assert Transcript.of(events).shown() == ["A whole answer."]
    assert kit.store.chats[chat_id].streaming is None
    # A later run has nothing to announce.
    kit.store.send(chat_id, "again")
    kit.model.add([Text("Again.")])
    await kit.run(chat_id)
    assert _kinds(kit, chat_id).count("reply_discarded") == 1


async def test_a_failure_before_the_next_generation_streams_discards_no_persisted_reply() -> None:
    kit = LoopKit()
    echo = kit.tools.gate("echo")
    kit.model.add([Text("Let me look."), Call("echo", id="c1")])
    chat_id = kit.create_chat()
    _, task = kit.start(chat_id)
    await echo.reached()
    # The next step cannot even build its request: the tools cannot be listed.
    kit.tools.listing_errors.append(ModelError("UNAVAILABLE", "toolexec is down"))
    echo.open()
    await finish(task)
    assert kit.store.chats[chat_id].status == "error"
    assert kit.store.roles(chat_id) == ["user", "assistant", "tool"]
    # The reply streamed and persisted in step 1 stays: nothing is announced discarded.
    assert "reply_discarded" not in _kinds(kit, chat_id)
