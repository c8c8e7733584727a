"""OpenAI Responses API wire format (POST /v1/responses), streaming and not."""

from __future__ import annotations

import time
from typing import Any

from services.simulator.plan import ReplyPlan, RequestView, Usage
from services.simulator.wire_common import Step, WireError, content_chars, sse_event, text_of

ASSISTANT_ITEM_TYPES = ("function_call", "reasoning")


def parse(body: dict[str, Any]) -> RequestView:
    """Summarize a Responses request; a run of assistant items (message, calls, reasoning) is one turn."""
    model = body.get("model")
    items = body.get("input")
    if not isinstance(model, str) or not model:
        raise WireError("Missing required parameter: 'model'.")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise WireError("Missing required parameter: 'input'.")
    users: list[str] = []
    turns = 0
    in_assistant = False
    chars = content_chars(body.get("instructions") or "")
    for item in items:
        if not isinstance(item, dict):
            continue
        role = item.get("role")
        kind = item.get("type", "message")
        chars += content_chars(item.get("content") or item.get("arguments") or item.get("output") or "")
        assistant = role == "assistant" or kind in ASSISTANT_ITEM_TYPES
        if assistant and not in_assistant:
            turns += 1
        in_assistant = assistant
        if role == "user":
            users.append(text_of(item.get("content")))
    texts = [t for t in users if t]
    max_tokens = body.get("max_output_tokens")
    return RequestView(
        model=model,
        first_user_text=users[0] if users else "",
        last_user_text=texts[-1] if texts else "",
        assistant_turns=turns,
        input_chars=chars,
        max_tokens=int(max_tokens) if max_tokens else None,
    )


def usage_json(usage: Usage) -> dict[str, Any]:
    """Responses usage: input includes cached tokens; output includes reasoning."""
    total_input = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    return {
        "input_tokens": total_input,
        "input_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": total_input + usage.output_tokens,
    }


def _items(plan: ReplyPlan) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if plan.reasoning_chunks:
        items.append(
            {
                "type": "reasoning",
                "id": f"rs_{plan.response_id}",
                "summary": [{"type": "summary_text", "text": plan.reasoning}],
            }
        )
    if plan.text_chunks:
        items.append(
            {
                "type": "message",
                "id": f"msg_{plan.response_id}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": plan.text, "annotations": []}],
            }
        )
    for call in plan.tool_calls:
        items.append(
            {
                "type": "function_call",
                "id": f"fc_{call.id}",
                "call_id": call.id,
                "name": call.name,
                "arguments": call.arguments,
                "status": "completed",
            }
        )
    return items


def _response(plan: ReplyPlan, status: str, output: list[dict[str, Any]], usage: bool) -> dict[str, Any]:
    incomplete = None
    if status == "incomplete":
        incomplete = {"reason": "max_output_tokens" if plan.finish == "length" else "content_filter"}
    return {
        "id": plan.response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": plan.model,
        "status": status,
        "output": output,
        "incomplete_details": incomplete,
        "error": None,
        "usage": usage_json(plan.usage) if usage else None,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


def _final_status(plan: ReplyPlan) -> str:
    return "incomplete" if plan.finish in ("length", "content_filter") else "completed"


def render_json(plan: ReplyPlan) -> dict[str, Any]:
    """A non-streaming response object."""
    return _response(plan, _final_status(plan), _items(plan), usage=True)


def render_stream(plan: ReplyPlan, include_usage: bool = True) -> list[Step]:
    """response.created, output items with their deltas, response.completed (or .incomplete)."""
    del include_usage  # The Responses API always reports usage on the final event.
    steps: list[Step] = []
    seq = 0

    def emit(payload: dict[str, Any], output: bool = False) -> None:
        nonlocal seq
        payload["sequence_number"] = seq
        seq += 1
        steps.append((sse_event(str(payload["type"]), payload), output))

    emit({"type": "response.created", "response": _response(plan, "in_progress", [], usage=False)})
    items = _items(plan)
    out = 0
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            emit({"type": "response.output_item.added", "output_index": out, "item": {**item, "summary": []}})
            part = {"type": "summary_text", "text": ""}
            emit(
                {
                    "type": "response.reasoning_summary_part.added",
                    "item_id": item["id"],
                    "output_index": out,
                    "summary_index": 0,
                    "part": part,
                }
            )
            for c in plan.reasoning_chunks:
                emit(
                    {
                        "type": "response.reasoning_summary_text.delta",
                        "item_id": item["id"],
                        "output_index": out,
                        "summary_index": 0,
                        "delta": c,
                    },
                    output=True,
                )
            emit(
                {
                    "type": "response.reasoning_summary_text.done",
                    "item_id": item["id"],
                    "output_index": out,
                    "summary_index": 0,
                    "text": plan.reasoning,
                }
            )
        elif kind == "message":
            emit(
                {
                    "type": "response.output_item.added",
                    "output_index": out,
                    "item": {**item, "status": "in_progress", "content": []},
                }
            )
            emit(
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": out,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }
            )
            for c in plan.text_chunks:
                emit(
                    {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": out,
                        "content_index": 0,
                        "delta": c,
                        "logprobs": [],
                    },
                    output=True,
                )
            emit(
                {
                    "type": "response.output_text.done",
                    "item_id": item["id"],
                    "output_index": out,
                    "content_index": 0,
                    "text": plan.text,
                    "logprobs": [],
                }
            )
        else:
            call = next(c for c in plan.tool_calls if c.id == item["call_id"])
            emit(
                {
                    "type": "response.output_item.added",
                    "output_index": out,
                    "item": {**item, "arguments": "", "status": "in_progress"},
                }
            )
            for frag in call.fragments:
                emit(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item["id"],
                        "output_index": out,
                        "delta": frag,
                    },
                    output=True,
                )
            emit(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": out,
                    "arguments": call.arguments,
                }
            )
        emit({"type": "response.output_item.done", "output_index": out, "item": item})
        out += 1
    status = _final_status(plan)
    final_type = "response.completed" if status == "completed" else "response.incomplete"
    emit({"type": final_type, "response": _response(plan, status, items, usage=True)})
    return steps


def malformed_chunk() -> bytes:
    """An event whose data is not JSON."""
    return b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "del\n\n'
