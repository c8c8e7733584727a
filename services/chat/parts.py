"""Content parts: validation, JSON storage form, and conversion to the inference contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2
from google.protobuf import json_format

from services.common.errors import InvalidArgument

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_TEXT_CHARS = 1_000_000
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


def validate_user_content(field: str, parts: Sequence[chat_pb2.ContentPart]) -> None:
    """User messages carry text and images only, with at least some text or an image."""
    if not parts:
        raise InvalidArgument(field, "must contain at least one text or image part")
    for i, part in enumerate(parts):
        kind = part.WhichOneof("part")
        where = f"{field}[{i}]"
        if kind == "text":
            if not part.text.text.strip():
                raise InvalidArgument(f"{where}.text.text", "must not be empty")
            if len(part.text.text) > MAX_TEXT_CHARS:
                raise InvalidArgument(f"{where}.text.text", f"must be at most {MAX_TEXT_CHARS} characters")
        elif kind == "image":
            if part.image.mime_type not in IMAGE_TYPES:
                raise InvalidArgument(
                    f"{where}.image.mime_type", f"must be one of {', '.join(sorted(IMAGE_TYPES))}"
                )
            if not part.image.data or len(part.image.data) > MAX_IMAGE_BYTES:
                raise InvalidArgument(f"{where}.image.data", "must hold 1 byte to 10 MB of image data")
        elif kind is None:
            raise InvalidArgument(where, "must set one of text or image")
        else:
            raise InvalidArgument(where, f"a user message may hold text and image parts only, not {kind}")


def to_json(parts: Sequence[chat_pb2.ContentPart]) -> list[dict[str, Any]]:
    """The JSONB storage form of parts."""
    return [json_format.MessageToDict(p, preserving_proto_field_name=True) for p in parts]


def from_json(data: Sequence[dict[str, Any]]) -> list[chat_pb2.ContentPart]:
    """Parts from their JSONB storage form."""
    return [json_format.ParseDict(d, chat_pb2.ContentPart()) for d in data]


def text_of(parts: Sequence[chat_pb2.ContentPart]) -> str:
    """The concatenated text parts."""
    return "".join(p.text.text for p in parts if p.WhichOneof("part") == "text")


def derive_title(parts: Sequence[chat_pb2.ContentPart], limit: int = 80) -> str:
    """A title from the first line of a prompt."""
    text = " ".join(text_of(parts).split())
    if not text:
        return "New chat"
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def to_inference(part: chat_pb2.ContentPart) -> inference_pb2.ContentPart | None:
    """One chat part as an inference part (None for parts the model never sees)."""
    kind = part.WhichOneof("part")
    if kind == "text":
        return inference_pb2.ContentPart(text=inference_pb2.TextPart(text=part.text.text))
    if kind == "image":
        return inference_pb2.ContentPart(
            image=inference_pb2.ImagePart(data=part.image.data, mime_type=part.image.mime_type)
        )
    if kind == "reasoning":
        r = part.reasoning
        return inference_pb2.ContentPart(
            reasoning=inference_pb2.ReasoningPart(
                text=r.text, signature=r.signature, redacted_data=r.redacted_data
            )
        )
    if kind == "tool_call":
        c = part.tool_call
        return inference_pb2.ContentPart(
            tool_call=inference_pb2.ToolCallPart(id=c.id, name=c.name, arguments_json=c.arguments_json)
        )
    if kind == "tool_result":
        t = part.tool_result
        return inference_pb2.ContentPart(
            tool_result=inference_pb2.ToolResultPart(
                tool_call_id=t.tool_call_id, tool_name=t.tool_name, content=t.content, is_error=t.is_error
            )
        )
    return None


def text_part(text: str) -> chat_pb2.ContentPart:
    """A text part."""
    return chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))
