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
# A user message's parts: each was bounded, their number and their text in all were not (10,000
# parts, or fifteen parts of a million characters, were stored and sent to the model as they were).
MAX_CONTENT_PARTS = 100
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
KIND_NAMES = {"reasoning": "a reasoning part", "tool_call": "a tool call", "tool_result": "a tool result"}


def _invalid(field: str, message: str) -> InvalidArgument:
    """InvalidArgument worded for people; the field path (``content[1].image.data``) stays machine-readable.

    The message speaks of "the message" and its parts, which is what a user typed; clients that
    want the exact path read it from the error's metadata (``field``), as for every InvalidArgument.
    """
    err = InvalidArgument(field, message)
    err.message = message
    err.args = (message,)
    return err


def _part_name(index: int, count: int) -> str:
    """How an error names part `index` of a message of `count` parts."""
    if count == 1:
        return "the message"
    if index < len(ORDINALS):
        return f"the message's {ORDINALS[index]} part"
    return f"part {index + 1} of the message"


def validate_user_content(field: str, parts: Sequence[chat_pb2.ContentPart]) -> None:
    """User messages carry text and images only, with at least some text or an image.

    Errors name the message and its part in words (``the message's second part: ...``); the
    request field path (``content[1].text.text``) is in the error's ``field`` metadata.
    """
    if not parts:
        raise _invalid(field, "the message is empty: give it some text or an image")
    if len(parts) > MAX_CONTENT_PARTS:
        raise _invalid(field, f"the message has {len(parts):,} parts; the limit is {MAX_CONTENT_PARTS}")
    for i, part in enumerate(parts):
        kind = part.WhichOneof("part")
        where = f"{field}[{i}]"
        name = _part_name(i, len(parts))
        if kind == "text":
            if not part.text.text.strip():
                raise _invalid(f"{where}.text.text", f"{name}: text must not be empty")
            if len(part.text.text) > MAX_TEXT_CHARS:
                raise _invalid(
                    f"{where}.text.text",
                    f"{name}: text is {len(part.text.text):,} characters; the limit is {MAX_TEXT_CHARS:,}",
                )
        elif kind == "image":
            if part.image.mime_type not in IMAGE_TYPES:
                got = repr(part.image.mime_type) if part.image.mime_type else "not given"
                raise _invalid(
                    f"{where}.image.mime_type",
                    f"{name}: the image type is {got}; use one of {', '.join(sorted(IMAGE_TYPES))}",
                )
            if not part.image.data:
                raise _invalid(f"{where}.image.data", f"{name}: the image is empty")
            if len(part.image.data) > MAX_IMAGE_BYTES:
                raise _invalid(
                    f"{where}.image.data",
                    f"{name}: the image is {len(part.image.data):,} bytes; the limit is 10 MB",
                )
        elif kind is None:
            raise _invalid(where, f"{name} is empty: give it text or an image")
        else:
            raise _invalid(
                where,
                f"{name} is {KIND_NAMES.get(kind, kind)}; a user message may hold text and images only",
            )
    total = sum(len(p.text.text) for p in parts)
    if total > MAX_TEXT_CHARS:
        raise _invalid(
            field, f"the message's text is {total:,} characters in all; the limit is {MAX_TEXT_CHARS:,}"
        )


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
