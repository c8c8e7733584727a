"""Request builders and event helpers for the inference tests."""

from __future__ import annotations

import json
from typing import Any

import grpc
from agentplane.inference.v1 import inference_pb2, inference_service_pb2

from services.common.rpc_errors import error_info

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)
TOOLS = [
    inference_pb2.ToolDefinition(
        name="read_file",
        description="Read a file.",
        input_schema_json=json.dumps({"type": "object", "properties": {"path": {"type": "string"}}}),
    ),
    inference_pb2.ToolDefinition(
        name="list_dir",
        description="List a directory.",
        input_schema_json=json.dumps({"type": "object", "properties": {"path": {"type": "string"}}}),
    ),
]


def user(*parts: inference_pb2.ContentPart) -> inference_pb2.Message:
    """A user message."""
    return inference_pb2.Message(role=inference_pb2.ROLE_USER, parts=list(parts))


def text(value: str) -> inference_pb2.ContentPart:
    """A text part."""
    return inference_pb2.ContentPart(text=inference_pb2.TextPart(text=value))


def image(data: bytes, mime: str = "image/png") -> inference_pb2.ContentPart:
    """An image part."""
    return inference_pb2.ContentPart(image=inference_pb2.ImagePart(data=data, mime_type=mime))


def request(model_id: str, prompt: str, **kwargs: Any) -> inference_service_pb2.GenerateRequest:
    """A GenerateRequest with one user text message."""
    return inference_service_pb2.GenerateRequest(
        model_config_id=model_id, messages=[user(text(prompt))], chat_id="chat-1", user_id="alice", **kwargs
    )


def kinds(events: list[Any]) -> list[str]:
    """The oneof name of each event."""
    return [e.WhichOneof("event") for e in events]


def joined(events: list[Any], kind: str) -> str:
    """All text of one delta kind."""
    return "".join(getattr(e, kind).text for e in events if e.WhichOneof("event") == kind)


def tool_calls(events: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, parsed arguments) of every tool call event."""
    return [
        (e.tool_call.name, json.loads(e.tool_call.arguments_json)) for e in events if e.HasField("tool_call")
    ]


def reason_of(exc: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason of a failed call."""
    info = error_info(exc)
    return info[0] if info else None
