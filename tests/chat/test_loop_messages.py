"""Properties of history -> model messages (`to_model_messages`), over generated histories.

Histories mix user messages, assistant messages with and without tool calls, tool messages that
answer some calls (in any order, twice, or calls that are not there), summaries and notices
only the user sees. Every message carries a unique marker (`m<i>`) so the test can tell which
history message an output message came from.
"""

from __future__ import annotations

import re

from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.chat.loop_messages import INTERRUPTED_TEXT, to_model_messages

ROLE = chat_pb2.MessageRole
MARKER = re.compile(r"\bm\d+\b")


def _text(value: str) -> chat_pb2.ContentPart:
    return chat_pb2.ContentPart(text=chat_pb2.TextPart(text=value))


@st.composite
def histories(draw: st.DrawFn) -> list[chat_pb2.Message]:
    out: list[chat_pb2.Message] = []
    next_call = 0
    last_calls: list[str] = []
    for i in range(draw(st.integers(0, 14))):
        marker = f"m{i}"
        kind = draw(st.sampled_from(["user", "assistant", "assistant", "tool", "tool", "summary", "notice"]))
        if kind == "user":
            out.append(chat_pb2.Message(id=marker, role=chat_pb2.MESSAGE_ROLE_USER, parts=[_text(marker)]))
        elif kind == "assistant":
            parts = []
            if draw(st.booleans()):
                parts.append(
                    chat_pb2.ContentPart(reasoning=chat_pb2.ReasoningPart(text="thinking", signature="s"))
                )
            parts.append(_text(marker))
            last_calls = []
            for _ in range(draw(st.integers(0, 3))):
                call_id = f"c{next_call}"
                next_call += 1
                last_calls.append(call_id)
                parts.append(chat_pb2.ContentPart(tool_call=chat_pb2.ToolCallPart(id=call_id, name="echo")))
            out.append(chat_pb2.Message(id=marker, role=chat_pb2.MESSAGE_ROLE_ASSISTANT, parts=parts))
        elif kind == "tool":
            answered = draw(st.lists(st.sampled_from(last_calls), unique=True)) if last_calls else []
            answered = draw(st.permutations(answered))
            if draw(st.booleans()) and answered:
                answered.append(answered[0])  # answered twice: the first answer counts
            if draw(st.booleans()):
                answered.append(f"stray{i}")  # answers no call
            results = [
                chat_pb2.ContentPart(
                    tool_result=chat_pb2.ToolResultPart(
                        tool_call_id=c, tool_name="echo", content=f"{marker}:{c}"
                    )
                )
                for c in answered
            ]
            out.append(chat_pb2.Message(id=marker, role=chat_pb2.MESSAGE_ROLE_TOOL, parts=results))
        elif kind == "summary":
            out.append(chat_pb2.Message(id=marker, role=chat_pb2.MESSAGE_ROLE_SUMMARY, parts=[_text(marker)]))
        else:
            out.append(
                chat_pb2.Message(
                    id=marker,
                    role=chat_pb2.MESSAGE_ROLE_ASSISTANT,
                    parts=[_text(marker)],
                    visibility=chat_pb2.VISIBILITY_USER,
                )
            )
    return out


def _model_visible_from_latest_summary(history: list[chat_pb2.Message]) -> list[chat_pb2.Message]:
    visible = [m for m in history if m.visibility != chat_pb2.VISIBILITY_USER]
    summaries = [i for i, m in enumerate(visible) if m.role == chat_pb2.MESSAGE_ROLE_SUMMARY]
    return visible[summaries[-1] :] if summaries else visible


def _calls(m: inference_pb2.Message) -> list[str]:
    return [p.tool_call.id for p in m.parts if p.WhichOneof("part") == "tool_call"]


def _results(m: inference_pb2.Message) -> list[inference_pb2.ToolResultPart]:
    return [p.tool_result for p in m.parts if p.WhichOneof("part") == "tool_result"]


def _first_answers(kept: list[chat_pb2.Message]) -> dict[str, str]:
    """call id -> content of its first result in the tool messages right after its assistant message."""
    answers: dict[str, str] = {}
    calls: set[str] = set()
    for m in kept:
        if m.role == chat_pb2.MESSAGE_ROLE_TOOL:
            for p in m.parts:
                r = p.tool_result
                if r.tool_call_id in calls and r.tool_call_id not in answers:
                    answers[r.tool_call_id] = r.content
        else:
            calls = {p.tool_call.id for p in m.parts if p.WhichOneof("part") == "tool_call"}
    return answers


@settings(max_examples=300, deadline=None)
@given(histories())
def test_order_kept_and_nothing_before_the_latest_summary(history: list[chat_pb2.Message]) -> None:
    out = to_model_messages(history)
    kept = _model_visible_from_latest_summary(history)
    sent = [
        MARKER.findall("".join(p.text.text for p in m.parts))
        for m in out
        if m.role != inference_pb2.ROLE_TOOL
    ]
    assert sent == [[m.id] for m in kept if m.role != chat_pb2.MESSAGE_ROLE_TOOL]
    if kept and kept[0].role == chat_pb2.MESSAGE_ROLE_SUMMARY:
        assert out[0].role == inference_pb2.ROLE_USER
        assert out[0].parts[0].text.text == f"Summary of the conversation so far:\n\n{kept[0].id}"


@settings(max_examples=300, deadline=None)
@given(histories())
def test_every_call_is_answered_once_right_after_it_in_call_order(history: list[chat_pb2.Message]) -> None:
    out = to_model_messages(history)
    for i, m in enumerate(out):
        if m.role == inference_pb2.ROLE_TOOL:
            # A tool message only ever answers the assistant message just before it.
            assert i > 0 and out[i - 1].role == inference_pb2.ROLE_ASSISTANT and _calls(out[i - 1])
        calls = _calls(m)
        if calls:
            assert i + 1 < len(out) and out[i + 1].role == inference_pb2.ROLE_TOOL
            assert [r.tool_call_id for r in _results(out[i + 1])] == calls


@settings(max_examples=300, deadline=None)
@given(histories())
def test_real_results_are_sent_and_unanswered_calls_are_closed_as_interrupted(
    history: list[chat_pb2.Message],
) -> None:
    out = to_model_messages(history)
    answers = _first_answers(_model_visible_from_latest_summary(history))
    for m in out:
        for r in _results(m):
            if r.tool_call_id in answers:
                assert (r.content, r.is_error) == (answers[r.tool_call_id], False)
            else:
                assert (r.content, r.is_error) == (INTERRUPTED_TEXT, True)


def test_a_trailing_unanswered_call_is_closed() -> None:
    history = [
        chat_pb2.Message(role=chat_pb2.MESSAGE_ROLE_USER, parts=[_text("m0")]),
        chat_pb2.Message(
            role=chat_pb2.MESSAGE_ROLE_ASSISTANT,
            parts=[chat_pb2.ContentPart(tool_call=chat_pb2.ToolCallPart(id="c1", name="echo"))],
        ),
    ]
    out = to_model_messages(history)
    assert [m.role for m in out] == [
        inference_pb2.ROLE_USER,
        inference_pb2.ROLE_ASSISTANT,
        inference_pb2.ROLE_TOOL,
    ]
    assert _results(out[2])[0].content == INTERRUPTED_TEXT
