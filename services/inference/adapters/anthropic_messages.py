"""Anthropic Messages: prompt-caching marks, extended thinking as reasoning (signatures kept)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
from agentplane.config.v1 import config_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2

from services.inference.adapters import common
from services.inference.events import (
    Finished,
    ProviderEvent,
    ReasoningChunk,
    TextChunk,
    ToolCall,
    UsageReport,
)

STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}
EFFORT_BUDGETS = {"low": 2048, "medium": 8192, "high": 24576}
CACHE = {"type": "ephemeral"}
# The fewest output tokens left for the answer when thinking has a budget.
MIN_ANSWER_TOKENS = 1024


def _arguments(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, RecursionError):
        value = None
    # Anthropic requires an object; a model's malformed call is replayed as its raw text.
    return value if isinstance(value, dict) else {"_raw_arguments": raw}


def _image(image: inference_pb2.ImagePart) -> dict[str, Any]:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": image.mime_type, "data": common.b64(image.data)},
    }


def build_messages(request: inference_service_pb2.GenerateRequest) -> list[dict[str, Any]]:
    """Normalized messages as Anthropic content blocks; tool results become user turns, same roles merge."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        blocks: list[dict[str, Any]] = []
        role = "assistant" if message.role == inference_pb2.ROLE_ASSISTANT else "user"
        for part in message.parts:
            kind = part.WhichOneof("part")
            if kind == "text":
                if part.text.text:
                    blocks.append({"type": "text", "text": part.text.text})
            elif kind == "image":
                blocks.append(_image(part.image))
            elif kind == "reasoning":
                r = part.reasoning
                if r.redacted_data:
                    blocks.append({"type": "redacted_thinking", "data": r.redacted_data.decode()})
                elif r.signature:
                    # Unsigned reasoning cannot be replayed to Anthropic; it is dropped.
                    blocks.append({"type": "thinking", "thinking": r.text, "signature": r.signature})
            elif kind == "tool_call":
                c = part.tool_call
                blocks.append(
                    {"type": "tool_use", "id": c.id, "name": c.name, "input": _arguments(c.arguments_json)}
                )
            elif kind == "tool_result":
                t = part.tool_result
                content: list[dict[str, Any]] = [{"type": "text", "text": t.content or "(empty)"}]
                content.extend(_image(img) for img in t.images)
                blocks.append(
                    {
                        "type": "tool_result",
                        "tool_use_id": t.tool_call_id,
                        "content": content,
                        "is_error": t.is_error,
                    }
                )
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    # Prompt caching: mark the last block of the last two messages (the system prompt is marked apart).
    for entry in out[-2:]:
        last = entry["content"][-1]
        if last["type"] not in ("thinking", "redacted_thinking"):
            last["cache_control"] = CACHE
    return out


def build_params(
    request: inference_service_pb2.GenerateRequest, model: config_pb2.ModelConfig, default_max_tokens: int
) -> dict[str, Any]:
    """Keyword arguments of `messages.create`."""
    limit = common.max_tokens(request, model) or default_max_tokens
    params: dict[str, Any] = {"model": model.model_name, "messages": build_messages(request), "stream": True}
    if request.system_prompt:
        params["system"] = [{"type": "text", "text": request.system_prompt, "cache_control": CACHE}]
    if request.tools:
        params["tools"] = [
            {"name": t.name, "description": t.description, "input_schema": common.schema(t)}
            for t in request.tools
        ]
        mode = request.tool_choice.mode
        if mode == inference_pb2.TOOL_CHOICE_MODE_NONE:
            params["tool_choice"] = {"type": "none"}
        elif mode == inference_pb2.TOOL_CHOICE_MODE_REQUIRED:
            params["tool_choice"] = {"type": "any"}
        elif mode == inference_pb2.TOOL_CHOICE_MODE_TOOL:
            params["tool_choice"] = {"type": "tool", "name": request.tool_choice.tool_name}
    effort = common.effort(request, model)
    budget = model.options.thinking_budget_tokens
    if effort in EFFORT_BUDGETS and budget == 0:
        budget = EFFORT_BUDGETS[effort]
    if effort == "none":
        budget = 0
    if budget > 0:
        params["thinking"] = {"type": "enabled", "budget_tokens": budget}
        limit = max(limit, budget + MIN_ANSWER_TOKENS)
    else:
        # Anthropic refuses a temperature together with extended thinking.
        temp = common.temperature(request, model)
        if temp is not None:
            params["temperature"] = min(temp, 1.0)
    params["max_tokens"] = limit
    extra = common.extra_body(model)
    if extra:
        params["extra_body"] = extra
    return params


async def stream(client: anthropic.AsyncAnthropic, params: dict[str, Any]) -> AsyncIterator[ProviderEvent]:
    """Stream one message; tool_use input is assembled per block and yielded when the block stops."""
    response = await client.messages.create(**params)
    model = params["model"]
    response_id = ""
    usage = UsageReport()
    stop: str | None = None
    blocks: dict[int, list[str]] = {}  # index -> [kind, id, name, json]
    try:
        async for event in response:
            kind = event.type
            if kind == "content_block_delta":
                delta = event.delta
                dkind = delta.type
                if dkind == "text_delta":
                    yield TextChunk(delta.text)
                elif dkind == "thinking_delta":
                    yield ReasoningChunk(text=delta.thinking)
                elif dkind == "input_json_delta":
                    blocks[event.index][3] += delta.partial_json
                elif dkind == "signature_delta":
                    yield ReasoningChunk(signature=delta.signature)
            elif kind == "content_block_start":
                block = event.content_block
                if block.type == "tool_use":
                    blocks[event.index] = ["tool_use", block.id, block.name, ""]
                elif block.type == "redacted_thinking":
                    yield ReasoningChunk(redacted=block.data.encode())
                elif block.type == "text" and block.text:
                    yield TextChunk(block.text)
            elif kind == "content_block_stop":
                entry = blocks.pop(event.index, None)
                if entry is not None:
                    yield ToolCall(id=entry[1], name=entry[2], arguments=entry[3] or "{}")
            elif kind == "message_start":
                message = event.message
                response_id = message.id
                model = message.model or model
                u = message.usage
                usage.input_tokens = u.input_tokens or 0
                usage.cache_read_tokens = u.cache_read_input_tokens or 0
                usage.cache_write_tokens = u.cache_creation_input_tokens or 0
                usage.output_tokens = u.output_tokens or 0
            elif kind == "message_delta":
                stop = STOP.get(event.delta.stop_reason or "", "stop")
                u2 = event.usage
                usage.output_tokens = u2.output_tokens or usage.output_tokens
                if getattr(u2, "input_tokens", None):
                    usage.input_tokens = u2.input_tokens or usage.input_tokens
    finally:
        await response.close()
    if stop is None:
        raise anthropic.APIError(
            "the stream ended before message_delta", request=response.response.request, body=None
        )
    yield usage
    yield Finished(reason=stop, model=model, response_id=response_id)
