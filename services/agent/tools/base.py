"""What every tool returns, and the error a tool raises to produce an error result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call: text for the model plus structured data for clients."""

    content: str
    structured: dict[str, Any] = field(default_factory=dict)
    is_error: bool = False


class ToolError(Exception):
    """A tool call failed in a way the model can fix; becomes an error result, never an RPC error.

    The message says what was wrong and how to call the tool correctly.
    """

    def __init__(self, message: str, *, code: str = "tool_error", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details

    def to_result(self) -> ToolResult:
        """The error result the model sees."""
        return ToolResult(
            content=self.message,
            structured={"error": self.code, "message": self.message, **self.details},
            is_error=True,
        )
