"""OpenAI Responses API (used when the model config sets options.use_responses_api)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
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


def build_input(request: inference_service_pb2.GenerateRequest) -> list[dict[str, Any]]:
    """Normalized messages as Responses input items."""
    items: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == inference_pb2.ROLE_USER:
            content: list[dict[str, Any]] = []
            for part in message.parts:
                if part.HasField("text"):
                    content.append({"type": "input_text", "text": part.text.text})
                elif part.HasField("image"):
                    content.append(
                        {"type": "input_image", "image_url": common.data_url(part.image), "detail": "auto"}
                    )
            items.append({"role": "user", "content": content})
        elif message.role == inference_pb2.ROLE_ASSISTANT:
            text = "".join(p.text.text for p in message.parts if p.HasField("text"))
            if text:
                items.append({"role": "assistant", "content": text})
            for p in message.parts:
                if p.HasField("tool_call"):
                    c = p.tool_call
                    items.append(
                        {
                            "type": "function_call",
                            "call_id": c.id,
                            "name": c.name,
                            "arguments": c.arguments_json or "{}",
                        }
                    )
        else:
            images: list[dict[str, Any]] = []
            for p in message.parts:
                r = p.tool_result
                items.append(
                    {
                        "type": "function_call_output",
                        "call_id": r.tool_call_id,
                        "output": common.tool_result_text(r),
                    }
                )
                images.extend(
                    {"type": "input_image", "image_url": common.data_url(img), "detail": "auto"}
                    for img in r.images
                )
            if images:
                items.append(
                    {
                        "role": "user",
                        "content": [{"type": "input_text", "text": "Images from the tool results:"}, *images],
                    }
                )
    return items


def build_params(
    request: inference_service_pb2.GenerateRequest, model: config_pb2.ModelConfig
) -> dict[str, Any]:
    """Keyword arguments of `responses.create`."""
    params: dict[str, Any] = {
        "model": model.model_name,
        "input": build_input(request),
        "stream": True,
        "store": False,
    }
    if request.system_prompt:
        params["instructions"] = request.system_prompt
    if request.tools:
        params["tools"] = [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": common.schema(t),
                "strict": False,
            }
            for t in request.tools
        ]
        mode = request.tool_choice.mode
        if mode == inference_pb2.TOOL_CHOICE_MODE_NONE:
            params["tool_choice"] = "none"
        elif mode == inference_pb2.TOOL_CHOICE_MODE_REQUIRED:
            params["tool_choice"] = "required"
        elif mode == inference_pb2.TOOL_CHOICE_MODE_TOOL:
            params["tool_choice"] = {"type": "function", "name": request.tool_choice.tool_name}
    limit = common.max_tokens(request, model)
    if limit:
        params["max_output_tokens"] = limit
    temp = common.temperature(request, model)
    if temp is not None:
        params["temperature"] = temp
    effort = common.effort(request, model)
    if effort is not None:
        params["reasoning"] = {"effort": effort, "summary": "auto"}
    extra = common.extra_body(model)
    if extra:
        params["extra_body"] = extra
    return params


async def stream(client: openai.AsyncOpenAI, params: dict[str, Any]) -> AsyncIterator[ProviderEvent]:
    """Stream one response; function-call arguments are assembled per item."""
    response = await client.responses.create(**params)
    calls: dict[str, list[str]] = {}  # item id -> [call id, name, arguments]
    done_calls: list[ToolCall] = []
    final: Any = None
    try:
        async for event in response:
            kind = event.type
            if kind == "response.output_text.delta":
                yield TextChunk(event.delta)
            elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
                yield ReasoningChunk(text=event.delta)
            elif kind == "response.function_call_arguments.delta":
                calls[event.item_id][2] += event.delta
            elif kind == "response.output_item.added":
                item = event.item
                if item.type == "function_call":
                    calls[item.id or item.call_id] = [item.call_id, item.name, item.arguments or ""]
            elif kind == "response.output_item.done":
                item = event.item
                if item.type == "function_call":
                    entry = calls.pop(item.id or item.call_id, [item.call_id, item.name, ""])
                    done_calls.append(
                        ToolCall(id=entry[0], name=entry[1], arguments=item.arguments or entry[2])
                    )
                    yield done_calls[-1]
            elif kind in ("response.completed", "response.incomplete"):
                final = event.response
            elif kind in ("response.failed", "error"):
                body = {
                    "error": getattr(getattr(event, "response", None), "error", None)
                    or {"message": str(event)}
                }
                raise openai.APIError(
                    "the response failed", request=response.response.request, body=_plain(body)
                )
    finally:
        await response.close()
    if final is None:
        raise openai.APIError(
            "the stream ended before response.completed", request=response.response.request, body=None
        )
    if final.usage is not None:
        u = final.usage
        cached = u.input_tokens_details.cached_tokens if u.input_tokens_details else 0
        reasoning = u.output_tokens_details.reasoning_tokens if u.output_tokens_details else 0
        yield UsageReport(
            input_tokens=max(0, u.input_tokens - cached),
            output_tokens=u.output_tokens,
            reasoning_tokens=reasoning,
            cache_read_tokens=cached,
        )
    reason = "tool_calls" if done_calls else "stop"
    if final.status == "incomplete":
        why = final.incomplete_details.reason if final.incomplete_details else None
        reason = "content_filter" if why == "content_filter" else "length"
    yield Finished(reason=reason, model=final.model or params["model"], response_id=final.id)


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
