"""Helpers shared by the wire formats: SSE framing, stream steps and request errors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

# A stream step is (bytes to write, whether it carries model output). Pacing (time to first
# token, per-token delay) and mid-stream faults count only output-carrying steps.
Step = tuple[bytes, bool]
ErrorResponse = tuple[int, dict[str, Any], dict[str, str]]


class WireError(ValueError):
    """The request body is not valid for the endpoint; answered with HTTP 400."""


def sse_data(payload: dict[str, Any]) -> bytes:
    """An SSE event without a name (OpenAI Chat Completions style)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """A named SSE event (Anthropic and Responses style)."""
    return (
        b"event: "
        + name.encode()
        + b"\ndata: "
        + json.dumps(payload, separators=(",", ":")).encode()
        + b"\n\n"
    )


def retry_after_headers(retry_after: float | None) -> dict[str, str]:
    """Retry-After in whole seconds (rounded up) plus the millisecond form OpenAI also sends."""
    if retry_after is None:
        return {}
    return {"retry-after": str(math.ceil(retry_after)), "retry-after-ms": str(int(retry_after * 1000))}


def text_of(content: Any, text_types: tuple[str, ...] = ("text", "input_text", "output_text")) -> str:
    """The text of a message content (a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") in text_types
        )
    return ""


def content_chars(content: Any) -> int:
    """Rough size of a content value in characters, for input-token estimates (images count 340)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = str(part.get("type", ""))
            if "image" in kind:
                total += 340
            else:
                total += sum(len(str(v)) for k, v in part.items() if k not in ("type", "cache_control"))
        return total
    if isinstance(content, dict):
        return len(json.dumps(content))
    return 0


@dataclass(frozen=True)
class ModelInfo:
    """A model the simulator lists."""

    id: str
    display_name: str
