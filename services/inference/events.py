"""Provider-neutral events an adapter yields while reading a provider stream.

Adapters assemble tool calls themselves, so a ToolCall is always complete.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TextChunk:
    """A piece of answer text."""

    text: str


@dataclass(slots=True)
class ReasoningChunk:
    """A piece of reasoning, or (at a block's end) its signature / redacted data."""

    text: str = ""
    signature: str = ""
    redacted: bytes = b""


@dataclass(slots=True)
class ToolCall:
    """A complete tool call."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class UsageReport:
    """Normalized token counts: input excludes cached tokens; output includes reasoning."""

    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(slots=True)
class Finished:
    """The provider ended the stream: "stop", "tool_calls", "length" or "content_filter"."""

    reason: str
    model: str
    response_id: str


ProviderEvent = TextChunk | ReasoningChunk | ToolCall | UsageReport | Finished
