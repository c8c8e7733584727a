"""OpenAI Chat Completions (OpenAI and OpenAI-compatible providers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
from agentplane.config.v1 import config_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2
from openai.types.chat import ChatCompletion

from services.inference.adapters import common
from services.inference.events import (
    Finished,
    ProviderEvent,
    ReasoningChunk,
    TextChunk,
    ToolCall,
    UsageReport,
)

FINISH = {"stop": "stop", "tool_calls": "tool_calls", "function_call": "tool_calls", "length": "length"}
FINISH["content_filter"] = "content_filter"


def build_messages(request: inference_service_pb2.GenerateRequest) -> list[dict[str, Any]]:
    """Normalized messages in Chat Completions form."""
    out: list[dict[str, Any]] = []
    if request.system_prompt:
        out.append({"role": "system", "content": request.system_prompt})
    for message in request.messages:
        if message.role == inference_pb2.ROLE_USER:
            parts: list[dict[str, Any]] = []
            for part in message.parts:
                if part.HasField("text"):
                    parts.append({"type": "text", "text": part.text.text})
                elif part.HasField("image"):
                    parts.append({"type": "image_url", "image_url": {"url": common.data_url(part.image)}})
            if len(parts) == 1 and parts[0]["type"] == "text":
                out.append({"role": "user", "content": parts[0]["text"]})
            else:
                out.append({"role": "user", "content": parts})
        elif message.role == inference_pb2.ROLE_ASSISTANT:
            text = "".join(p.text.text for p in message.parts if p.HasField("text"))
            entry: dict[str, Any] = {"role": "assistant", "content": text or None}
            calls = [
                {
                    "id": p.tool_call.id,
                    "type": "function",
                    "function": {"name": p.tool_call.name, "arguments": p.tool_call.arguments_json or "{}"},
                }
                for p in message.parts
                if p.HasField("tool_call")
            ]
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        else:
            images: list[dict[str, Any]] = []
            for p in message.parts:
                result = p.tool_result
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": result.tool_call_id,
                        "content": common.tool_result_text(result),
                    }
                )
                images.extend(
                    {"type": "image_url", "image_url": {"url": common.data_url(img)}} for img in result.images
                )
            if images:
                # Tool messages cannot carry images in Chat Completions: a user message follows with them.
                out.append(
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "Images from the tool results:"}, *images],
                    }
                )
    return out


def build_params(
    request: inference_service_pb2.GenerateRequest,
    model: config_pb2.ModelConfig,
    provider_type: int,
) -> dict[str, Any]:
    """Keyword arguments of `chat.completions.create`."""
    params: dict[str, Any] = {
        "model": model.model_name,
        "messages": build_messages(request),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        params["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": common.schema(t)},
            }
            for t in request.tools
        ]
        mode = request.tool_choice.mode
        if mode == inference_pb2.TOOL_CHOICE_MODE_NONE:
            params["tool_choice"] = "none"
        elif mode == inference_pb2.TOOL_CHOICE_MODE_REQUIRED:
            params["tool_choice"] = "required"
        elif mode == inference_pb2.TOOL_CHOICE_MODE_TOOL:
            params["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.tool_name}}
    limit = common.max_tokens(request, model)
    if limit:
        # OpenAI renamed the field; compatible servers (vLLM, Ollama) still expect max_tokens.
        key = "max_completion_tokens" if provider_type == config_pb2.PROVIDER_TYPE_OPENAI else "max_tokens"
        params[key] = limit
    temp = common.temperature(request, model)
    if temp is not None:
        params["temperature"] = temp
    effort = common.effort(request, model)
    if effort is not None:
        params["reasoning_effort"] = effort
    extra = common.extra_body(model)
    if extra:
        params["extra_body"] = extra
    return params


async def stream(client: openai.AsyncOpenAI, params: dict[str, Any]) -> AsyncIterator[ProviderEvent]:
    """Stream one completion; tool calls are assembled by index and yielded whole before Finished.

    Chunks arrive as the decoded JSON dicts: building the SDK's pydantic model for every chunk
    (recursively, with its type introspection) was about a fifth of this service's event-loop
    CPU at scale, and we read only a handful of fields.
    """
    response = await _create(client, params)
    calls: dict[int, list[str]] = {}
    finish: str | None = None
    model = params["model"]
    response_id = ""
    try:
        async for chunk in response:
            if not isinstance(chunk, dict):
                continue
            response_id = chunk.get("id") or response_id
            model = chunk.get("model") or model
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                yield _usage(usage)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    # Compatible servers (vLLM, DeepSeek, Ollama) send reasoning under either name.
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if reasoning and isinstance(reasoning, str):
                        yield ReasoningChunk(text=reasoning)
                    content = delta.get("content")
                    if content:
                        yield TextChunk(content)
                    for tc in delta.get("tool_calls") or ():
                        index = int(tc.get("index") or 0)
                        entry = calls.get(index)
                        if entry is None:
                            entry = calls[index] = ["", "", ""]
                        if tc.get("id"):
                            entry[0] = tc["id"]
                        fn = tc.get("function")
                        if isinstance(fn, dict):
                            if fn.get("name"):
                                entry[1] += fn["name"]
                            if fn.get("arguments"):
                                entry[2] += fn["arguments"]
                reason = choice.get("finish_reason")
                if reason:
                    finish = FINISH.get(reason, "stop")
    finally:
        await response.close()
    for index in sorted(calls):
        call_id, name, arguments = calls[index]
        yield ToolCall(id=call_id, name=name, arguments=arguments)
    if finish is None:
        raise openai.APIError(
            "the stream ended without a finish reason", request=response.response.request, body=None
        )
    if calls and finish == "stop":
        finish = "tool_calls"
    yield Finished(reason=finish, model=model, response_id=response_id)


def _usage(usage: dict[str, Any]) -> UsageReport:
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = prompt_details.get("cached_tokens") or 0
    reasoning = completion_details.get("reasoning_tokens") or 0
    return UsageReport(
        input_tokens=max(0, (usage.get("prompt_tokens") or 0) - cached),
        output_tokens=usage.get("completion_tokens") or 0,
        reasoning_tokens=reasoning,
        cache_read_tokens=cached,
    )


async def _create(client: openai.AsyncOpenAI, params: dict[str, Any]) -> openai.AsyncStream[object]:
    """`chat.completions.create(**params, stream=True)` without the SDK's request transform.

    `create` walks the whole request through the SDK's TypedDict transform (aliases, date
    formats) on every call; for a long history that was a tenth of this service's CPU at
    scale. Our parameters are plain JSON with no aliased or formatted fields, so the SDK's own
    `post` with the same path and body sends exactly the same request; `AsyncStream[object]`
    keeps the SDK's SSE decoding and error handling but hands over each chunk's dict as is.
    """
    body = {k: v for k, v in params.items() if k != "extra_body"}
    body.update(params.get("extra_body") or {})
    return await client.post(
        "/chat/completions",
        body=body,
        cast_to=ChatCompletion,
        stream=True,
        stream_cls=openai.AsyncStream[object],
    )
