"""A chat's history as the messages a model is sent.

Providers accept a history only when every tool call is answered by the message right after
it and every tool result answers such a call. A persisted history need not look like that: an
interrupt or a lost worker leaves calls without results, and a summary replaces everything
before it. `to_model_messages` sends what the model may see, from the latest summary on, and
answers each assistant message's calls in one tool message, in call order: the first persisted
result of each call, or a synthetic "interrupted" error for a call that has none.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2

from services.chat import parts as parts_mod

INTERRUPTED_TEXT = "The tool call was interrupted before it finished; it may not have run."

_ROLES = {
    chat_pb2.MESSAGE_ROLE_USER: inference_pb2.ROLE_USER,
    chat_pb2.MESSAGE_ROLE_ASSISTANT: inference_pb2.ROLE_ASSISTANT,
}


def interrupted_result(call: chat_pb2.ToolCallPart) -> chat_pb2.ToolResultPart:
    """The result given to a call that never finished."""
    return chat_pb2.ToolResultPart(
        tool_call_id=call.id, tool_name=call.name, content=INTERRUPTED_TEXT, is_error=True
    )


def tool_calls(message: chat_pb2.Message) -> list[chat_pb2.ToolCallPart]:
    """The tool calls of a message, in order."""
    return [p.tool_call for p in message.parts if p.WhichOneof("part") == "tool_call"]


def model_visible(history: Sequence[chat_pb2.Message]) -> list[chat_pb2.Message]:
    """The messages a model may see: not the user-only ones, and nothing before the latest summary."""
    visible = [m for m in history if m.visibility != chat_pb2.VISIBILITY_USER]
    for i in range(len(visible) - 1, -1, -1):
        if visible[i].role == chat_pb2.MESSAGE_ROLE_SUMMARY:
            return visible[i:]
    return visible


def to_model_messages(history: Sequence[chat_pb2.Message]) -> list[inference_pb2.Message]:
    """Model-visible history as inference messages, every tool call answered right after it."""
    out: list[inference_pb2.Message] = []
    # The calls of the last assistant message and the results seen for them so far: tool
    # messages right after it answer them; anything else closes them.
    calls: list[chat_pb2.ToolCallPart] = []
    results: dict[str, chat_pb2.ToolResultPart] = {}

    def close_calls() -> None:
        if calls:
            parts = [
                parts_mod.to_inference(
                    chat_pb2.ContentPart(tool_result=results.get(c.id) or interrupted_result(c))
                )
                for c in calls
            ]
            out.append(
                inference_pb2.Message(role=inference_pb2.ROLE_TOOL, parts=[p for p in parts if p is not None])
            )
        calls.clear()
        results.clear()

    for m in model_visible(history):
        if m.role == chat_pb2.MESSAGE_ROLE_TOOL:
            wanted = {c.id for c in calls}
            for p in m.parts:
                r = p.tool_result
                # A result for no call of the message before it cannot be sent: providers refuse it.
                if p.WhichOneof("part") == "tool_result" and r.tool_call_id in wanted:
                    results.setdefault(r.tool_call_id, r)
            continue
        close_calls()
        if m.role == chat_pb2.MESSAGE_ROLE_SUMMARY:
            text = f"Summary of the conversation so far:\n\n{parts_mod.text_of(m.parts)}"
            out.append(
                inference_pb2.Message(
                    role=inference_pb2.ROLE_USER,
                    parts=[inference_pb2.ContentPart(text=inference_pb2.TextPart(text=text))],
                )
            )
            continue
        converted = [p for p in (parts_mod.to_inference(p) for p in m.parts) if p is not None]
        if not converted:
            continue
        out.append(inference_pb2.Message(role=_ROLES[m.role], parts=converted))
        if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT:
            calls.extend(tool_calls(m))
    close_calls()
    return out
