"""Helpers shared by the adapters."""

from __future__ import annotations

import base64
import json
from typing import Any

from agentplane.config.v1 import config_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2
from google.protobuf import json_format

EFFORTS: dict[int, str] = {
    inference_pb2.REASONING_EFFORT_NONE: "none",
    inference_pb2.REASONING_EFFORT_LOW: "low",
    inference_pb2.REASONING_EFFORT_MEDIUM: "medium",
    inference_pb2.REASONING_EFFORT_HIGH: "high",
}


def data_url(image: inference_pb2.ImagePart) -> str:
    """An image as a data: URL."""
    return f"data:{image.mime_type};base64,{base64.b64encode(image.data).decode()}"


def b64(data: bytes) -> str:
    """Base64 text of bytes."""
    return base64.b64encode(data).decode()


def schema(tool: inference_pb2.ToolDefinition) -> dict[str, Any]:
    """A tool's JSON Schema as a dict (an empty object schema when none was given)."""
    if not tool.input_schema_json:
        return {"type": "object", "properties": {}}
    parsed: dict[str, Any] = json.loads(tool.input_schema_json)
    return parsed


def effort(request: inference_service_pb2.GenerateRequest, model: config_pb2.ModelConfig) -> str | None:
    """The effective reasoning effort name, or None for the provider's default."""
    value = int(request.options.reasoning_effort) or int(model.options.reasoning_effort)
    return EFFORTS.get(value)


def temperature(
    request: inference_service_pb2.GenerateRequest, model: config_pb2.ModelConfig
) -> float | None:
    """The request's temperature, else the model config's, else None."""
    if request.options.HasField("temperature"):
        return request.options.temperature
    if model.options.HasField("temperature"):
        return model.options.temperature
    return None


def max_tokens(request: inference_service_pb2.GenerateRequest, model: config_pb2.ModelConfig) -> int | None:
    """The request's output limit, else the model config's, else None."""
    if request.options.HasField("max_output_tokens"):
        return request.options.max_output_tokens
    return model.max_output_tokens or None


def extra_body(model: config_pb2.ModelConfig) -> dict[str, Any] | None:
    """The model config's pass-through body fields."""
    if not model.options.HasField("extra_body") or not model.options.extra_body.fields:
        return None
    return json_format.MessageToDict(model.options.extra_body)


def tool_result_text(result: inference_pb2.ToolResultPart) -> str:
    """Tool result content; errors are marked for providers without an error flag."""
    return f"Error: {result.content}" if result.is_error else result.content
