"""Anthropic Messages wire format (POST /v1/messages), streaming and not."""

from __future__ import annotations

import json
from typing import Any

from services.simulator.plan import ReplyPlan, RequestView, Usage
from services.simulator.wire_common import (
    ErrorResponse,
    Step,
    WireError,
    content_chars,
    retry_after_headers,
    sse_event,
    text_of,
)

STOP_REASONS = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "length": "max_tokens",
    "content_filter": "refusal",
}


def parse(body: dict[str, Any]) -> RequestView:
    """Summarize a Messages request."""
    model = body.get("model")
    messages = body.get("messages")
    if not isinstance(model, str) or not model:
        raise WireError("model: Field required")
    if not isinstance(messages, list) or not messages:
        raise WireError("messages: at least one message is required")
    if not isinstance(body.get("max_tokens"), int):
        raise WireError("max_tokens: Field required")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    user_texts = [text_of(m.get("content")) for m in users]
    texts_with_content = [t for t in user_texts if t]
    system = body.get("system")
    return RequestView(
        model=model,
        first_user_text=user_texts[0] if user_texts else "",
        last_user_text=texts_with_content[-1] if texts_with_content else "",
        assistant_turns=sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant"),
        input_chars=sum(content_chars(m.get("content")) for m in messages if isinstance(m, dict))
        + content_chars(system or "")
        + content_chars(body.get("tools") or []),
        max_tokens=int(body["max_tokens"]),
    )


def usage_json(usage: Usage, output_tokens: int | None = None) -> dict[str, Any]:
    """Anthropic usage: input tokens exclude cache reads and writes, which are reported apart."""
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "output_tokens": usage.output_tokens if output_tokens is None else output_tokens,
    }


def _blocks(plan: ReplyPlan) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if plan.reasoning_chunks:
        blocks.append({"type": "thinking", "thinking": plan.reasoning, "signature": plan.signature})
    if plan.text_chunks:
        blocks.append({"type": "text", "text": plan.text})
    for call in plan.tool_calls:
        try:
            parsed: Any = json.loads(call.arguments) if call.arguments else {}
        except json.JSONDecodeError:
            parsed = {}
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": parsed})
    return blocks


def render_json(plan: ReplyPlan) -> dict[str, Any]:
    """A non-streaming message object."""
    return {
        "id": plan.response_id,
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": _blocks(plan),
        "stop_reason": STOP_REASONS[plan.finish],
        "stop_sequence": None,
        "usage": usage_json(plan.usage),
    }


def render_stream(plan: ReplyPlan, include_usage: bool = True) -> list[Step]:
    """message_start, content blocks (thinking, text, tool_use), message_delta, message_stop."""
    del include_usage  # Anthropic always reports usage.
    start = {
        "type": "message_start",
        "message": {
            "id": plan.response_id,
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_json(plan.usage, output_tokens=1),
        },
    }
    steps: list[Step] = [
        (sse_event("message_start", start), False),
        (sse_event("ping", {"type": "ping"}), False),
    ]
    index = 0

    def block_start(block: dict[str, Any]) -> None:
        steps.append(
            (
                sse_event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": block},
                ),
                False,
            )
        )

    def delta(payload: dict[str, Any], output: bool = True) -> None:
        event = {"type": "content_block_delta", "index": index, "delta": payload}
        steps.append((sse_event("content_block_delta", event), output))

    def block_stop() -> None:
        steps.append((sse_event("content_block_stop", {"type": "content_block_stop", "index": index}), False))

    if plan.reasoning_chunks:
        block_start({"type": "thinking", "thinking": "", "signature": ""})
        for c in plan.reasoning_chunks:
            delta({"type": "thinking_delta", "thinking": c})
        delta({"type": "signature_delta", "signature": plan.signature}, output=False)
        block_stop()
        index += 1
    if plan.text_chunks:
        block_start({"type": "text", "text": ""})
        for c in plan.text_chunks:
            delta({"type": "text_delta", "text": c})
        block_stop()
        index += 1
    for call in plan.tool_calls:
        block_start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        for frag in call.fragments:
            delta({"type": "input_json_delta", "partial_json": frag})
        block_stop()
        index += 1
    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": STOP_REASONS[plan.finish], "stop_sequence": None},
        "usage": {"output_tokens": plan.usage.output_tokens},
    }
    steps.append((sse_event("message_delta", message_delta), False))
    steps.append((sse_event("message_stop", {"type": "message_stop"}), False))
    return steps


def malformed_chunk() -> bytes:
    """An event whose data is not JSON."""
    return b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"ty\n\n'


def error(kind: str, retry_after: float | None, message: str | None = None) -> ErrorResponse:
    """The HTTP status, body and headers Anthropic answers a failure with."""

    def body(type_: str, msg: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": type_, "message": msg}}

    if kind == "rate_limit":
        msg = "This request would exceed the rate limit for your organization. Please try again later."
        return 429, body("rate_limit_error", msg), retry_after_headers(retry_after)
    if kind == "overloaded":
        return 529, body("overloaded_error", "Overloaded"), {}
    if kind == "invalid_key":
        return 401, body("authentication_error", "invalid x-api-key"), {}
    if kind == "context_length":
        return 400, body("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"), {}
    if kind == "bad_request":
        return 400, body("invalid_request_error", message or "Invalid request."), {}
    return 500, body("api_error", "Internal server error"), {}
