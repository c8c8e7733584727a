"""OpenAI Chat Completions wire format (POST /v1/chat/completions), streaming and not."""

from __future__ import annotations

import time
from typing import Any

from services.simulator.plan import ReplyPlan, RequestView, Usage
from services.simulator.wire_common import (
    ErrorResponse,
    Step,
    WireError,
    content_chars,
    retry_after_headers,
    sse_data,
    text_of,
)

DONE = b"data: [DONE]\n\n"


def parse(body: dict[str, Any]) -> RequestView:
    """Summarize a Chat Completions request."""
    model = body.get("model")
    messages = body.get("messages")
    if not isinstance(model, str) or not model:
        raise WireError("you must provide a model parameter")
    if not isinstance(messages, list) or not messages:
        raise WireError("'messages' must be a non-empty array")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    return RequestView(
        model=model,
        first_user_text=text_of(users[0].get("content")) if users else "",
        last_user_text=text_of(users[-1].get("content")) if users else "",
        assistant_turns=sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant"),
        input_chars=sum(content_chars(m.get("content")) for m in messages if isinstance(m, dict))
        + content_chars(body.get("tools") or []),
        max_tokens=int(max_tokens) if max_tokens else None,
    )


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI usage: prompt tokens include cached ones; reasoning is part of completion tokens."""
    prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens, "audio_tokens": 0},
    }


def render_json(plan: ReplyPlan) -> dict[str, Any]:
    """A non-streaming chat.completion object."""
    message: dict[str, Any] = {"role": "assistant", "content": plan.text or None, "refusal": None}
    if plan.reasoning_chunks:
        message["reasoning_content"] = plan.reasoning
    if plan.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in plan.tool_calls
        ]
    return {
        "id": plan.response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "choices": [{"index": 0, "message": message, "finish_reason": plan.finish, "logprobs": None}],
        "usage": usage_json(plan.usage),
    }


def render_stream(plan: ReplyPlan, include_usage: bool) -> list[Step]:
    """chat.completion.chunk events; parallel tool-call fragments interleave by index."""
    created = int(time.time())
    head = {
        "id": plan.response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": plan.model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_data({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    steps: list[Step] = [(chunk({"role": "assistant", "content": ""}), False)]
    steps.extend((chunk({"reasoning_content": c}), True) for c in plan.reasoning_chunks)
    steps.extend((chunk({"content": c}), True) for c in plan.text_chunks)
    for i, call in enumerate(plan.tool_calls):
        start = {
            "index": i,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        steps.append((chunk({"tool_calls": [start]}), True))
    longest = max((len(c.fragments) for c in plan.tool_calls), default=0)
    for f in range(longest):
        for i, call in enumerate(plan.tool_calls):
            if f < len(call.fragments):
                frag = {"index": i, "function": {"arguments": call.fragments[f]}}
                steps.append((chunk({"tool_calls": [frag]}), True))
    steps.append((chunk({}, plan.finish), False))
    if include_usage:
        steps.append((sse_data({**head, "choices": [], "usage": usage_json(plan.usage)}), False))
    steps.append((DONE, False))
    return steps


def malformed_chunk() -> bytes:
    """A chunk whose data is not JSON."""
    return b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content": "tru\n\n'


def error(kind: str, retry_after: float | None, message: str | None = None) -> ErrorResponse:
    """The HTTP status, body and headers OpenAI answers a failure with."""

    def body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
        return {"error": {"message": message, "type": type_, "param": param, "code": code}}

    if kind == "rate_limit":
        msg = "Rate limit reached for requests per min (RPM). Please try again later."
        return 429, body(msg, "requests", "rate_limit_exceeded"), retry_after_headers(retry_after)
    if kind == "overloaded":
        return (
            503,
            body("The engine is currently overloaded, please try again later.", "server_error", None),
            {},
        )
    if kind == "invalid_key":
        msg = "Incorrect API key provided. You can find your API key in your account settings."
        return 401, body(msg, "invalid_request_error", "invalid_api_key"), {}
    if kind == "context_length":
        msg = (
            "This model's maximum context length is 128000 tokens. However, your messages resulted in "
            "131072 tokens. Please reduce the length of the messages."
        )
        return 400, body(msg, "invalid_request_error", "context_length_exceeded", "messages"), {}
    if kind == "bad_request":
        return 400, body(message or "Invalid request.", "invalid_request_error", None), {}
    return (
        500,
        body(
            "The server had an error while processing your request. Sorry about that!", "server_error", None
        ),
        {},
    )
