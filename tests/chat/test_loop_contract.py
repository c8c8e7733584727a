"""The loop's interfaces stand alone: identity is passed explicitly, what the store returned is
not used as a side channel, and a turn's start is a value the store returns."""

from __future__ import annotations

from services.chat import loop as loop_mod
from services.chat.domain import Fence, RunInfo
from services.common import auth
from tests.chat.loopkit import OWNER, Call, FakeTools, LoopKit, Text


async def test_every_call_names_the_owner_and_none_relies_on_ambient_identity() -> None:
    kit = LoopKit(tools=FakeTools(files={"AGENTS.md": "Be brief."}))
    kit.model.add([Call("echo", id="c1"), Call("read_file", {"path": "AGENTS.md"}, id="c2")], [Text("ok")])
    chat_id = kit.create_chat(owner_id="bob")
    await kit.run(chat_id)
    assert [c.name for c in kit.tools.calls] == ["read_file", "echo", "read_file"]
    assert {c.user_id for c in kit.tools.calls} == {"bob"}
    assert {r.user_id for r in kit.model.requests} == {"bob"}
    # Nothing was acting for anyone around the calls: the adapters get the user from the arguments.
    assert {c.ambient_user for c in kit.tools.calls} == {None}
    assert kit.prompts.user_prompt_calls == ["bob", "bob"]


async def test_an_ambient_identity_does_not_leak_into_the_run() -> None:
    kit = LoopKit()
    kit.model.add([Call("echo", id="c1")], [Text("ok")])
    chat_id = kit.create_chat()
    with auth.acting_for("mallory"):
        await kit.run(chat_id)
    assert {c.user_id for c in kit.tools.calls} == {OWNER}
    assert {r.user_id for r in kit.model.requests} == {OWNER}


async def test_agents_md_read_in_a_run_does_not_change_the_run_info() -> None:
    kit = LoopKit(tools=FakeTools(files={"AGENTS.md": "Use tabs."}))
    kit.model.add([Text("one")])
    chat_id = kit.create_chat()
    ctx = kit.context(chat_id)
    info = RunInfo(chat_id, OWNER, "model-1", "ws-1", None)
    ctx.started = info  # as when the claim started the run
    await loop_mod.run_chat(ctx)
    assert info == RunInfo(chat_id, OWNER, "model-1", "ws-1", None)
    assert [w.agents_md for w in kit.store.writes if w.method == "persist"] == ["Use tabs."]


async def test_agents_md_is_cached_by_the_first_write_whatever_it_is() -> None:
    # Interrupted right after the call was streamed: the first write is the assistant message,
    # a run that recovers calls first writes tool results; either caches the text.
    kit = LoopKit(tools=FakeTools(files={"AGENTS.md": "Use tabs."}))
    kit.model.add([Call("echo", id="c1")], [Text("done")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    persists = [(w.role, w.agents_md) for w in kit.store.writes if w.method == "persist"]
    assert persists == [("assistant", "Use tabs."), ("tool", None), ("assistant", None)]


async def test_compact_outside_a_run_never_reads_agents_md() -> None:
    kit = LoopKit(tools=FakeTools(files={"AGENTS.md": "Use tabs."}))
    kit.model.add([Text("The summary.")])
    chat_id = kit.create_chat()
    kit.store.chats[chat_id].status = "waiting"
    ctx = loop_mod.RunContext(
        chat_id=chat_id,
        fence=Fence("", -1),
        store=kit.store,
        model=kit.model,
        tools=kit.tools,
        prompts=kit.prompts,
    )
    info = RunInfo(chat_id, OWNER, "model-1", "ws-1", None)
    await loop_mod.compact(ctx, info, await kit.store.history(chat_id), fenced=False)
    assert kit.tools.calls == []
    [write] = [w for w in kit.store.writes if w.method == "persist"]
    assert (write.role, write.agents_md, write.fenced) == ("summary", None, False)


def test_an_interrupt_counts_for_a_turn_only_when_seen_after_its_start_committed() -> None:
    kit = LoopKit()
    ctx = kit.context(kit.create_chat())
    ctx.begin_turn(10.0)
    ctx.interrupt(seen_at=9.0)  # a renewal that began before the commit, answered after it
    assert not ctx.interrupted.is_set()
    ctx.interrupt(seen_at=11.0)
    assert ctx.interrupted.is_set()


def test_the_next_turn_keeps_an_interrupt_seen_while_its_start_was_being_published() -> None:
    kit = LoopKit()
    ctx = kit.context(kit.create_chat())
    ctx.begin_turn(10.0)
    # The next turn's start commits at 20.0; until the store answers, the loop still knows 10.0.
    ctx.interrupt(seen_at=15.0)  # read the flag that start consumed: the previous turn's
    ctx.interrupt(seen_at=21.0)  # a client reacted to the published events: this turn's
    ctx.begin_turn(20.0)
    assert ctx.interrupted.is_set()

    stale = kit.context(kit.create_chat())
    stale.begin_turn(10.0)
    stale.interrupt(seen_at=15.0)
    stale.begin_turn(20.0)
    assert not stale.interrupted.is_set()


async def test_the_store_says_when_each_turn_began() -> None:
    kit = LoopKit()
    kit.model.add([Text("one")], [Text("two")])
    chat_id = kit.create_chat()
    kit.store.queue(chat_id, "next")
    ctx = await kit.run(chat_id)
    began = kit.store.turns_began[chat_id]
    assert len(began) == 2 and began[0] < began[1]
    assert ctx.turn_started == began[1]
