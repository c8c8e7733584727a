"""Scripts: scripted conversations the simulator replays, keyed by the first user message.

A script is a list of conversations. The conversation whose `match` is a substring of the
request's first user message is used (a conversation without `match` is the fallback), and
its turn number is the count of assistant messages already in the request's history, so one
script drives a multi-step agent run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULT_KINDS = (
    "rate_limit",
    "server_error",
    "overloaded",
    "slow_headers",
    "drop",
    "malformed",
    "invalid_key",
    "context_length",
)
FINISH_REASONS = ("stop", "tool_calls", "length", "content_filter")


class ScriptError(ValueError):
    """A script file or dict does not follow the documented format."""


@dataclass(frozen=True)
class Fault:
    """A failure the simulator produces instead of (or in the middle of) a normal reply.

    kind: one of FAULT_KINDS. `retry_after` (seconds) is sent with rate_limit.
    `delay_ms` is the header delay of slow_headers. `after_chunks` is how many content
    chunks are sent before drop/malformed. `times` is how many requests the fault hits
    (for a scripted turn: the first `times` requests that reach the turn).
    """

    kind: str
    retry_after: float | None = None
    delay_ms: float = 1000.0
    after_chunks: int = 2
    times: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """Parse a fault object (`{"kind": ..., ...}`)."""
        kind = data.get("kind")
        if kind not in FAULT_KINDS:
            raise ScriptError(f"fault.kind must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        retry_after = data.get("retry_after")
        return cls(
            kind=str(kind),
            retry_after=None if retry_after is None else float(retry_after),
            delay_ms=float(data.get("delay_ms", 1000.0)),
            after_chunks=int(data.get("after_chunks", 2)),
            times=int(data.get("times", 1)),
        )


@dataclass(frozen=True)
class Gate:
    """Where a reply stops until the test opens the gate `name` (see services/simulator/gates.py).

    The reply holds after `after_chunks` output chunks (0: before its first byte of content),
    so a test knows the model is "generating" and acts while it is, instead of hoping a delay
    is long enough. Written `"gate": "name"` or `"gate": {"name": ..., "after_chunks": N}`.
    """

    name: str
    after_chunks: int = 0

    @classmethod
    def from_data(cls, data: Any) -> Gate:
        """Parse a gate: a name, or an object with `name` and optional `after_chunks`."""
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
            raise ScriptError(f"gate must be a name or {{'name': ..., 'after_chunks': N}}, got {data!r}")
        after = data.get("after_chunks", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ScriptError(f"gate.after_chunks must be a whole number >= 0, got {after!r}")
        return cls(name=data["name"], after_chunks=after)


@dataclass(frozen=True)
class ScriptedToolCall:
    """A tool call in a scripted turn; `arguments` is a dict, or a raw string (may be invalid JSON)."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    # The call's id as the provider sends it; None generates a unique one. Scripts set it to play
    # providers that reuse ids ("call_0" every turn) or send none ("").
    id: str | None = None

    def arguments_json(self) -> str:
        """The arguments as the JSON text the model "writes"."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, separators=(",", ":"))


@dataclass(frozen=True)
class ScriptedUsage:
    """Normalized usage numbers a turn reports (each translated into the provider's format)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScriptedUsage:
        """Parse a usage object."""

        def opt(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else int(value)

        return cls(
            input_tokens=opt("input_tokens"),
            output_tokens=opt("output_tokens"),
            reasoning_tokens=opt("reasoning_tokens"),
            cache_read_tokens=int(data.get("cache_read_tokens", 0)),
            cache_write_tokens=int(data.get("cache_write_tokens", 0)),
        )


@dataclass(frozen=True)
class Turn:
    """One scripted model reply."""

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ScriptedToolCall, ...] = ()
    finish: str | None = None
    usage: ScriptedUsage | None = None
    ttft_ms: float | None = None
    token_delay_ms: float | None = None
    fault: Fault | None = None
    gate: Gate | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Turn:
        """Parse a turn object."""
        calls = []
        for raw in data.get("tool_calls", []) or []:
            if not isinstance(raw, dict) or not raw.get("name"):
                raise ScriptError(f"tool_calls entries need a name, got {raw!r}")
            args = raw.get("arguments", {})
            if not isinstance(args, dict | str):
                raise ScriptError("tool_calls[].arguments must be an object or a string")
            call_id = raw.get("id")
            if call_id is not None and not isinstance(call_id, str):
                raise ScriptError(f"tool_calls[].id must be a string, got {call_id!r}")
            calls.append(ScriptedToolCall(name=str(raw["name"]), arguments=args, id=call_id))
        finish = data.get("finish")
        if finish is not None and finish not in FINISH_REASONS:
            raise ScriptError(f"finish must be one of {', '.join(FINISH_REASONS)}, got {finish!r}")
        usage = data.get("usage")
        fault = data.get("fault")
        gate = data.get("gate")
        return cls(
            text=str(data.get("text", "")),
            reasoning=str(data.get("reasoning", "")),
            tool_calls=tuple(calls),
            finish=finish,
            usage=ScriptedUsage.from_dict(usage) if usage else None,
            ttft_ms=_opt_float(data.get("ttft_ms")),
            token_delay_ms=_opt_float(data.get("token_delay_ms")),
            fault=Fault.from_dict(fault) if fault else None,
            gate=None if gate is None else Gate.from_data(gate),
        )


@dataclass(frozen=True)
class Conversation:
    """Turns played for requests whose first user message contains `match` (None: fallback)."""

    turns: tuple[Turn, ...]
    match: str | None = None


@dataclass(frozen=True)
class Script:
    """A list of scripted conversations."""

    conversations: tuple[Conversation, ...] = ()

    @classmethod
    def from_data(cls, data: Any) -> Script:
        """Parse `{"conversations": [...]}` or a bare list of conversations."""
        if isinstance(data, dict):
            data = data.get("conversations")
        if not isinstance(data, list):
            raise ScriptError("a script is a list of conversations or {'conversations': [...]}")
        conversations = []
        for i, conv in enumerate(data):
            if not isinstance(conv, dict) or not isinstance(conv.get("turns"), list):
                raise ScriptError(f"conversation {i} needs a 'turns' list")
            match = conv.get("match")
            conversations.append(
                Conversation(
                    turns=tuple(Turn.from_dict(t) for t in conv["turns"]),
                    match=None if match is None else str(match),
                )
            )
        return cls(tuple(conversations))

    @classmethod
    def load(cls, path: str | Path) -> Script:
        """Read a JSON script file."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ScriptError(f"{path}: not valid JSON: {exc}") from exc
        return cls.from_data(data)

    def select(self, first_user_text: str, assistant_turns: int) -> tuple[int, int, Turn] | None:
        """The (conversation index, turn index, turn) for a request, or None past the script's end."""
        chosen: int | None = None
        for i, conv in enumerate(self.conversations):
            if conv.match is not None and conv.match in first_user_text:
                chosen = i
                break
        if chosen is None:
            chosen = next((i for i, c in enumerate(self.conversations) if c.match is None), None)
        if chosen is None:
            return None
        turns = self.conversations[chosen].turns
        if assistant_turns >= len(turns):
            return None
        return chosen, assistant_turns, turns[assistant_turns]


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
