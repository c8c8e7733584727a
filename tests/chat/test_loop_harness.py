"""The agent loop against in-memory fakes (tests/chat/loopkit.py): steps, streaming, tools, limits,
compaction and model errors, with no server."""

from __future__ import annotations

import asyncio

import pytest
from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2

from services.chat import loop as loop_mod
from services.chat import tool_ids
from services.chat.domain import Fence, NewMessage, RunInfo
from services.chat.loop import LoopConfig, ToolOutcome
from services.common.errors import FailedPrecondition
from tests.chat.loopkit import (
    MODEL,
    OWNER,
    Call,
    Fail,
    FakePrompts,
    FakeTools,
    LoopKit,
    Reasoning,
    Retry,
    Text,
    Usage,
    finish,
    is_summary_request,
    summary_reply,
)


def texts(msg: chat_pb2.Message) -> str:
    return "".join(p.text.text for p in msg.parts if p.WhichOneof("part") == "text")


def assistant(text: str, usage: chat_pb2.Usage | None = None) -> NewMessage:
    return NewMessage(
        "assistant", [chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))], "service:chat", usage=usage
    )


def user(text: str) -> NewMessage:
    return NewMessage("user", [chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))], OWNER)


def request_texts(req: inference_pb2.Message) -> str:
    return "".join(p.text.text for p in req.parts)


async def test_a_text_reply_is_streamed_persisted_and_numbered() -> None:
    kit = LoopKit()
    kit.model.add([Text("Hello"), Text(", world"), Usage(input_tokens=12, output_tokens=3, cost_micros=7)])
    chat_id = kit.create_chat("hi")
    await kit.run(chat_id)

    assert kit.store.roles(chat_id) == ["user", "assistant"]
    reply = kit.store.messages(chat_id)[-1]
    assert texts(reply) == "Hello, world"
    assert reply.usage.input_tokens == 12 and reply.usage.cost_micros == 7
    assert reply.model_config_id == MODEL
    assert kit.store.chats[chat_id].usage.output_tokens == 3
    deltas = kit.store.events_of(chat_id, "part_delta")
    assert "".join(d.part_delta.text for d in deltas) == "Hello, world"
    assert {d.part_delta.message_id for d in deltas} == {reply.id}
    assert kit.store.statuses(chat_id) == ["running", "waiting"]
    # Every event of the chat has the next seq, the message's own seq included.
    seqs = [e.seq for e in kit.store.events_of(chat_id)]
    assert seqs == list(range(1, len(seqs) + 1))
    persisted = kit.store.events_of(chat_id, "message_persisted")[-1]
    assert persisted.message_persisted.seq == persisted.seq == reply.seq
    # The request: system prompt, the history, the owner; tools because the chat has a workspace.
    [req] = kit.model.requests
    assert req.user_id == OWNER and req.model_config_id == MODEL and req.chat_id == chat_id
    assert req.system_prompt == "You are a test agent."
    assert [request_texts(m) for m in req.messages] == ["hi"]
    assert {t.name for t in req.tools} == {"echo", "read_file", "write_file"}


async def test_deltas_held_back_by_the_coalescer_go_out_with_the_message() -> None:
    kit = LoopKit(config=LoopConfig(delta_flush_ms=60_000))
    kit.model.add([Text("a"), Text("b"), Text("c")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    kinds = [e.WhichOneof("event") for e in kit.store.events_of(chat_id)]
    # The first delta flushes at once; the rest wait for the flush interval and are numbered
    # just before the message by the persist itself (no emit of their own).
    assert kinds == [
        "message_persisted",
        "status_changed",
        "part_delta",
        "part_delta",
        "message_persisted",
        "status_changed",
    ]
    deltas = kit.store.events_of(chat_id, "part_delta")
    assert [d.part_delta.text for d in deltas] == ["a", "bc"]
    assert [w.method for w in kit.store.writes].count("emit") == 1


async def test_reasoning_deltas_become_a_reasoning_part_replayed_to_the_model() -> None:
    kit = LoopKit()
    kit.model.add(
        [
            Reasoning("Let me "),
            Reasoning("think.", signature="sig-1"),
            Reasoning(redacted_data=b"\x01\x02"),
            Text("Answer."),
            Call("echo", {"x": 1}, id="c1"),
        ],
        [Text("Done.")],
    )
    chat_id = kit.create_chat()
    await kit.run(chat_id)

    first = kit.store.messages(chat_id)[1]
    kinds = [p.WhichOneof("part") for p in first.parts]
    assert kinds == ["reasoning", "text", "tool_call"]
    reasoning = first.parts[0].reasoning
    assert (reasoning.text, reasoning.signature, reasoning.redacted_data) == (
        "Let me think.",
        "sig-1",
        b"\x01\x02",
    )
    deltas = [e.part_delta for e in kit.store.events_of(chat_id, "part_delta")]
    # Reasoning streams as part 0, the answer as part 1; redacted data alone streams nothing.
    assert [(d.part_index, d.WhichOneof("delta"), d.reasoning or d.text) for d in deltas] == [
        (0, "reasoning", "Let me "),
        (0, "reasoning", "think."),
        (1, "text", "Answer."),
        (0, "text", "Done."),  # the next message's
    ]
    replayed = kit.model.requests[1].messages[1]
    assert replayed.role == inference_pb2.ROLE_ASSISTANT
    assert replayed.parts[0].reasoning.signature == "sig-1"
    assert replayed.parts[0].reasoning.redacted_data == b"\x01\x02"


async def test_retry_notices_become_retry_events_before_the_reply() -> None:
    kit = LoopKit()
    kit.model.add([Retry(attempt=2, delay_ms=250, reason="RATE_LIMITED", message="slow down"), Text("ok")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    kinds = [e.WhichOneof("event") for e in kit.store.events_of(chat_id)]
    assert kinds.index("retry_scheduled") < kinds.index("part_delta")
    [retry] = kit.store.events_of(chat_id, "retry_scheduled")
    r = retry.retry_scheduled
    assert (r.attempt, r.delay_ms, r.reason, r.message) == (2, 250, "RATE_LIMITED", "slow down")
    assert texts(kit.store.messages(chat_id)[-1]) == "ok"


async def test_tool_calls_run_and_their_results_are_persisted_in_call_order() -> None:
    kit = LoopKit()
    slow = kit.tools.gate("write_file")
    kit.model.add(
        [
            Text("Working."),
            Call("write_file", {"path": "a.txt", "content": "A"}, id="c1"),
            Call("echo", {"n": 2}, id="c2"),
            Call("nope", {}, id="c3"),
            Call("echo", '{"broken": ', id="c4"),
            Call("echo", "[1, 2]", id="c5"),
        ],
        [Text("All done.")],
    )
    chat_id = kit.create_chat()
    ctx, task = kit.start(chat_id)
    await slow.reached()
    slow.open()  # write_file (called first) finishes after echo
    await finish(task)

    assert kit.store.roles(chat_id) == ["user", "assistant", "tool", "assistant"]
    results = [p.tool_result for p in kit.store.messages(chat_id)[2].parts]
    assert [r.tool_call_id for r in results] == ["c1", "c2", "c3", "c4", "c5"]
    assert not results[0].is_error and results[0].content == "wrote a.txt"
    assert results[1].content == '{"n": 2}'
    assert results[2].is_error and "Unknown tool 'nope'" in results[2].content
    assert results[3].is_error and "not valid JSON" in results[3].content
    assert results[4].is_error and "must be a JSON object" in results[4].content
    # Only valid calls of known tools reach the tools, for the chat's workspace, with the model's
    # ids namespaced by chat, message and position (toolexec's ledger key).
    assert [(c.model_id, c.name, c.workspace_id) for c in kit.tools.model_calls] == [
        ("c1", "write_file", "ws-1"),
        ("c2", "echo", "ws-1"),
    ]
    assistant = kit.store.messages(chat_id)[1].id
    assert [c.tool_call_id for c in kit.tools.model_calls] == [
        tool_ids.ledger_id(chat_id, assistant, 0, "c1"),
        tool_ids.ledger_id(chat_id, assistant, 1, "c2"),
    ]
    assert kit.tools.files["a.txt"] == "A"
    started = [e.tool_call_started.tool_call.id for e in kit.store.events_of(chat_id, "tool_call_started")]
    assert started == ["c1", "c2", "c3", "c4", "c5"]
    finished = [
        e.tool_call_finished.tool_result.tool_call_id
        for e in kit.store.events_of(chat_id, "tool_call_finished")
    ]
    assert sorted(finished) == ["c1", "c2", "c3", "c4", "c5"] and finished[-1] == "c1"
    # The last call to finish is announced right before the results, by the same write.
    kinds = [e.WhichOneof("event") for e in kit.store.events_of(chat_id)]
    tool_msg_at = next(
        i
        for i, e in enumerate(kit.store.events_of(chat_id))
        if e.message_persisted.role == chat_pb2.MESSAGE_ROLE_TOOL
    )
    assert kinds[tool_msg_at - 1] == "tool_call_finished"
    # The follow-up request answers every call, in order.
    follow_up = kit.model.requests[1].messages
    assert [p.tool_result.tool_call_id for p in follow_up[2].parts] == ["c1", "c2", "c3", "c4", "c5"]
    assert ctx.steps_run == 2 and len(ctx.step_seconds) == 2


async def test_without_a_workspace_calls_are_answered_but_nothing_runs() -> None:
    kit = LoopKit()
    kit.model.add([Call("read_file", {"path": "x"}, id="c1")], [Text("I cannot.")])
    chat_id = kit.create_chat(workspace_id="")
    await kit.run(chat_id)
    result = kit.store.messages(chat_id)[2].parts[0].tool_result
    assert result.is_error and "no workspace" in result.content
    assert kit.tools.calls == [] and kit.tools.list_calls == 0
    assert not kit.model.requests[0].tools


async def test_a_tool_failure_is_a_result_the_model_sees() -> None:
    async def boom(args: dict[str, object]) -> ToolOutcome:
        raise loop_mod.ModelError("UNAVAILABLE", "toolexec went away")

    kit = LoopKit(tools=FakeTools(handlers={"boom": boom}))
    kit.model.add([Call("boom", id="c1")], [Text("It failed.")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    result = kit.store.messages(chat_id)[2].parts[0].tool_result
    assert result.is_error and result.content == "The tool call failed: toolexec went away"


async def test_a_run_that_died_after_persisting_calls_runs_them_with_the_same_ids() -> None:
    kit = LoopKit()
    calls = NewMessage(
        "assistant",
        [
            chat_pb2.ContentPart(
                tool_call=chat_pb2.ToolCallPart(id="c7", name="echo", arguments_json='{"a": 1}')
            )
        ],
        "service:chat",
    )
    chat_id = kit.create_chat("do it")
    kit.store.add_message(chat_id, calls)  # persisted by a run that died before the results
    kit.model.add([Text("Recovered.")])
    await kit.run(chat_id)
    # The same key the dead run used: the message's id and the call's position did not change.
    persisted = kit.store.messages(chat_id)[1].id
    assert [(c.tool_call_id, c.arguments) for c in kit.tools.model_calls] == [
        (tool_ids.ledger_id(chat_id, persisted, 0, "c7"), {"a": 1})
    ]
    assert kit.store.roles(chat_id) == ["user", "assistant", "tool", "assistant"]
    assert kit.model.requests[0].messages[2].parts[0].tool_result.content == '{"a": 1}'


async def test_tools_that_cannot_be_listed_answer_the_calls_with_an_error() -> None:
    kit = LoopKit()
    kit.tools.listing_errors.append(loop_mod.ModelError("PERMISSION_DENIED", "toolexec refused"))
    chat_id = kit.create_chat("do it")
    kit.store.add_message(
        chat_id,
        NewMessage(
            "assistant",
            [chat_pb2.ContentPart(tool_call=chat_pb2.ToolCallPart(id="c1", name="echo"))],
            "service:chat",
        ),
    )
    kit.model.add([Text("It failed.")])
    await kit.run(chat_id)
    result = kit.store.messages(chat_id)[2].parts[0].tool_result
    assert result.is_error and "could not be listed (toolexec refused)" in result.content
    assert kit.tools.model_calls == []
    assert kit.store.chats[chat_id].status == "waiting"


async def test_agents_md_is_read_once_per_chat_and_cached_by_the_next_write() -> None:
    kit = LoopKit(tools=FakeTools(files={"AGENTS.md": "Answer in haiku."}))
    kit.model.add([Call("echo", id="c1")], [Text("one")], [Text("two")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    reads = [c for c in kit.tools.calls if c.name == "read_file"]
    assert [(c.tool_call_id, c.arguments) for c in reads] == [
        (f"agentplane-agents-md-{chat_id}", {"path": "AGENTS.md"})
    ]
    for req in kit.model.requests:
        assert "Instructions from the workspace's AGENTS.md:\n\nAnswer in haiku." in req.system_prompt
    # The first persisted message caches it; later writes do not repeat it.
    persists = [w for w in kit.store.writes if w.method == "persist"]
    assert [w.agents_md for w in persists] == ["Answer in haiku.", None, None]
    assert kit.store.chats[chat_id].agents_md == "Answer in haiku."

    kit.store.send(chat_id, "again")  # a later run reads the cache, not the workspace
    await kit.run(chat_id)
    assert len([c for c in kit.tools.calls if c.name == "read_file"]) == 1
    assert "Answer in haiku." in kit.model.requests[-1].system_prompt


async def test_the_users_prompt_joins_the_system_prompt() -> None:
    kit = LoopKit(prompts=FakePrompts(user_prompts={OWNER: "Call me Al."}))
    kit.model.add([Text("ok")])
    await kit.run(kit.create_chat(workspace_id=""))
    assert kit.model.requests[0].system_prompt == "You are a test agent.\n\nCall me Al."
    assert kit.prompts.user_prompt_calls == [OWNER]


async def test_queued_messages_run_as_the_next_turns() -> None:
    kit = LoopKit()
    kit.model.add([Text("first")], [Text("second")], [Text("third")])
    chat_id = kit.create_chat("one")
    kit.store.queue(chat_id, "two")
    kit.store.queue(chat_id, "three")
    await kit.run(chat_id)
    assert [texts(m) for m in kit.store.messages(chat_id)] == [
        "one",
        "first",
        "two",
        "second",
        "three",
        "third",
    ]
    assert kit.store.statuses(chat_id) == ["running", "waiting"]


async def test_the_step_limit_ends_the_turn_with_a_message_for_the_user() -> None:
    kit = LoopKit(config=LoopConfig(step_limit=2, delta_flush_ms=0))
    kit.model.add([Call("echo", id="c1")], [Call("echo", id="c2")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    assert len(kit.model.requests) == 2
    assert kit.store.roles(chat_id) == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    last = kit.store.messages(chat_id)[-1]
    assert last.visibility == chat_pb2.VISIBILITY_USER
    assert "Stopped after 2 model steps" in texts(last)
    assert kit.store.statuses(chat_id)[-1] == "waiting"
    # The notice is for the user only: the next turn's model never sees it.
    kit.model.add([Text("continuing")])
    kit.store.send(chat_id, "go on")
    await kit.run(chat_id)
    sent = [request_texts(m) for m in kit.model.requests[-1].messages]
    assert not any("step limit" in t for t in sent) and sent[-1] == "go on"


async def test_a_model_error_ends_the_chat_with_its_reason() -> None:
    kit = LoopKit()
    kit.model.add([Text("partial"), Fail("PROVIDER_AUTH_FAILED", "the API key was rejected")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    chat = kit.store.chats[chat_id]
    assert chat.status == "error" and chat.last_error == ("PROVIDER_AUTH_FAILED", "the API key was rejected")
    assert kit.store.roles(chat_id) == ["user"]  # nothing half-generated is persisted
    [error] = kit.store.events_of(chat_id, "error")
    assert error.error.reason == "PROVIDER_AUTH_FAILED"
    assert kit.store.statuses(chat_id) == ["running", "error"]


# --- compaction ---------------------------------------------------------------------------


def over(used: int, limit: int = 1000) -> list[NewMessage]:
    """A history whose last generation used `used` tokens of `limit`."""
    return [
        user("earlier question"),
        assistant("earlier answer", chat_pb2.Usage(input_tokens=used - 50, output_tokens=50)),
    ]


async def test_compaction_starts_exactly_at_the_threshold() -> None:
    for used, compacts in ((799, False), (800, True)):
        kit = LoopKit(prompts=FakePrompts(context_limit=1000, threshold_percent=80))
        if compacts:
            kit.model.add(summary_reply("They asked twice."))
        kit.model.add([Text("answer")])
        chat_id = kit.create_chat("new question", history=over(used))
        await kit.run(chat_id)
        roles = kit.store.roles(chat_id)
        assert ("summary" in roles) is compacts, used
        if compacts:
            summary_req, req = kit.model.requests
            assert is_summary_request(summary_req) and not summary_req.tools
            # The summary request carries the whole history, then the instruction in the same user turn.
            assert [request_texts(m) for m in summary_req.messages][:2] == [
                "earlier question",
                "earlier answer",
            ]
            assert request_texts(summary_req.messages[-1]) == "new question" + loop_mod.SUMMARY_PROMPT
            # The generation after it starts from the summary alone.
            assert [request_texts(m) for m in req.messages] == [
                "Summary of the conversation so far:\n\nThey asked twice."
            ]
            summary = kit.store.messages(chat_id)[-2]
            assert summary.role == chat_pb2.MESSAGE_ROLE_SUMMARY and summary.usage.input_tokens == 50
        else:
            assert len(kit.model.requests) == 1


async def test_compaction_between_steps_of_one_turn() -> None:
    kit = LoopKit(prompts=FakePrompts(context_limit=1000, threshold_percent=50))
    kit.model.add(
        [Call("echo", {"a": 1}, id="c1"), Usage(input_tokens=600, output_tokens=10)],
        summary_reply("Echoed once."),
        [Text("Done.")],
    )
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    assert kit.store.roles(chat_id) == ["user", "assistant", "tool", "summary", "assistant"]
    assert is_summary_request(kit.model.requests[1])
    assert [request_texts(m) for m in kit.model.requests[2].messages] == [
        "Summary of the conversation so far:\n\nEchoed once."
    ]
    # A later turn's history starts at the summary too.
    kit.model.add([Text("again")])
    kit.store.send(chat_id, "more")
    await kit.run(chat_id)
    sent = [request_texts(m) for m in kit.model.requests[-1].messages]
    assert sent == ["Summary of the conversation so far:\n\nEchoed once.", "Done.", "more"]


async def test_context_length_error_compacts_and_retries_once() -> None:
    kit = LoopKit()
    kit.model.add(
        [Fail("CONTEXT_LENGTH_EXCEEDED", "too long")],
        summary_reply("Short version."),
        [Text("Fits now.")],
    )
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    assert kit.store.roles(chat_id) == ["user", "summary", "assistant"]
    assert kit.store.chats[chat_id].status == "waiting"
    assert [request_texts(m) for m in kit.model.requests[2].messages] == [
        "Summary of the conversation so far:\n\nShort version."
    ]


async def test_context_length_error_after_compacting_ends_the_chat() -> None:
    kit = LoopKit()
    kit.model.add(
        [Fail("CONTEXT_LENGTH_EXCEEDED", "too long")],
        summary_reply("Still long."),
        [Fail("CONTEXT_LENGTH_EXCEEDED", "still too long")],
    )
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    assert kit.store.chats[chat_id].last_error == ("CONTEXT_LENGTH_EXCEEDED", "still too long")
    assert len(kit.model.requests) == 3


async def test_a_model_error_while_compacting_ends_the_chat_with_its_reason() -> None:
    kit = LoopKit(prompts=FakePrompts(context_limit=1000, threshold_percent=80))
    kit.model.add([Fail("RATE_LIMITED", "the provider is rate limiting this key")])
    chat_id = kit.create_chat("next", history=over(900))
    await kit.run(chat_id)
    chat = kit.store.chats[chat_id]
    assert chat.status == "error"
    assert chat.last_error is not None and chat.last_error[0] == "RATE_LIMITED"
    assert "rate limiting this key" in chat.last_error[1] and "summarizing" in chat.last_error[1].lower()
    assert "summary" not in kit.store.roles(chat_id)


async def test_a_model_error_while_compacting_for_overflow_ends_the_chat_with_its_reason() -> None:
    kit = LoopKit()
    kit.model.add(
        [Fail("CONTEXT_LENGTH_EXCEEDED", "too long")], [Fail("PROVIDER_UNAVAILABLE", "provider down")]
    )
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    chat = kit.store.chats[chat_id]
    assert chat.last_error is not None and chat.last_error[0] == "PROVIDER_UNAVAILABLE"
    assert kit.store.statuses(chat_id) == ["running", "error"]


async def test_an_empty_summary_is_named_as_such() -> None:
    kit = LoopKit()
    kit.model.add([Fail("CONTEXT_LENGTH_EXCEEDED", "too long")], [Usage(input_tokens=5)], [Text("ok")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    assert texts(kit.store.messages(chat_id)[1]) == "(The model returned an empty summary.)"


async def test_compact_outside_a_run_is_unfenced_and_refused_while_a_run_owns_the_chat() -> None:
    kit = LoopKit()
    kit.model.add([Text("first")], summary_reply("S."), summary_reply("S2."))
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    ctx = loop_mod.RunContext(
        chat_id=chat_id,
        fence=Fence("", -1),  # CompactChat has no run: its write is not fenced
        store=kit.store,
        model=kit.model,
        tools=kit.tools,
        prompts=kit.prompts,
    )
    info = RunInfo(chat_id, OWNER, MODEL, "ws-1", "")
    summary = await loop_mod.compact(ctx, info, await kit.store.history(chat_id), fenced=False)
    assert summary.role == chat_pb2.MESSAGE_ROLE_SUMMARY
    assert [(w.role, w.fenced) for w in kit.store.writes if w.method == "persist"][-1] == ("summary", False)
    assert [texts(m) for m in await kit.store.history(chat_id)] == ["S."]

    kit.store.claim(chat_id)  # a worker took the chat meanwhile
    with pytest.raises(FailedPrecondition):
        await loop_mod.compact(ctx, info, await kit.store.history(chat_id), fenced=False)
    assert kit.store.roles(chat_id).count("summary") == 1


async def test_a_failed_generation_leaves_no_delta_flush_behind() -> None:
    kit = LoopKit(config=LoopConfig(delta_flush_ms=60_000))
    kit.model.add([Text("a"), Text("b"), Fail("PROVIDER_UNAVAILABLE", "gone")])
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    # "b" waited for the flush interval when the stream failed: its timer is gone with the run.
    assert [t for t in asyncio.all_tasks() if "_flush_later" in repr(t.get_coro())] == []
    assert [e.part_delta.text for e in kit.store.events_of(chat_id, "part_delta")] == ["a"]
    assert kit.store.chats[chat_id].last_error == ("PROVIDER_UNAVAILABLE", "gone")


async def test_retry_notices_while_compacting_are_announced_too() -> None:
    kit = LoopKit()
    kit.model.add(
        [Fail("CONTEXT_LENGTH_EXCEEDED", "too long")],
        summary_reply("S.", Retry(attempt=2, reason="PROVIDER_UNAVAILABLE", message="overloaded")),
        [Text("ok")],
    )
    chat_id = kit.create_chat()
    await kit.run(chat_id)
    [retry] = kit.store.events_of(chat_id, "retry_scheduled")
    assert (retry.retry_scheduled.reason, retry.retry_scheduled.message) == (
        "PROVIDER_UNAVAILABLE",
        "overloaded",
    )
