"""Reply plans: what the simulator will answer, independent of the wire format.

A plan holds the reply's reasoning, text (already split into stream chunks), tool calls
(arguments split into fragments), finish reason, usage and pacing. Each wire module turns
a plan into its provider's JSON or SSE events.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from services.simulator.script import Fault, Gate, ScriptedUsage, Turn

WORDS_DIRECTIVE = re.compile(r"\[\[words=(\d+)\]\]")
TOKEN_PATTERN = re.compile(r"\s*\S+")
DEFAULT_WORDS = 24
MAX_WORDS = 100_000
# Arguments are cut into pieces of this many characters, so clients must assemble them.
ARGUMENT_FRAGMENT_CHARS = 7
VOCABULARY = (
    "the agent reads the file and checks each function before it changes anything so the tests "
    "keep passing while the new code handles empty input errors and long lines in a clear way "
    "then it runs the suite again reports what changed and why the fix is safe for callers"
).split()


@dataclass(frozen=True)
class RequestView:
    """What the simulator needs from a request, whatever its wire format."""

    model: str
    first_user_text: str
    last_user_text: str
    assistant_turns: int
    input_chars: int
    max_tokens: int | None = None


@dataclass(frozen=True)
class PlannedToolCall:
    """A tool call with its id and its arguments cut into fragments."""

    id: str
    name: str
    arguments: str
    fragments: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    """Normalized token counts of a reply."""

    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class ReplyPlan:
    """A complete reply, ready to be rendered in any wire format."""

    response_id: str
    model: str
    reasoning_chunks: tuple[str, ...]
    text_chunks: tuple[str, ...]
    tool_calls: tuple[PlannedToolCall, ...]
    finish: str
    usage: Usage
    ttft_ms: float
    token_delay_ms: float
    signature: str = ""
    fault: Fault | None = None
    gate: Gate | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The whole answer text."""
        return "".join(self.text_chunks)

    @property
    def reasoning(self) -> str:
        """The whole reasoning text."""
        return "".join(self.reasoning_chunks)


def split_tokens(text: str) -> list[str]:
    """Split text into word-sized "tokens" (each keeps its leading whitespace), losslessly."""
    tokens = TOKEN_PATTERN.findall(text)
    consumed = sum(len(t) for t in tokens)
    if consumed < len(text):
        # Trailing whitespace is kept so the concatenation equals the input.
        if tokens:
            tokens[-1] += text[consumed:]
        else:
            tokens = [text]
    return tokens


def chunk(tokens: list[str], per_chunk: int) -> tuple[str, ...]:
    """Group tokens into stream chunks of `per_chunk` tokens."""
    size = max(1, per_chunk)
    return tuple("".join(tokens[i : i + size]) for i in range(0, len(tokens), size))


def fragments(arguments: str) -> tuple[str, ...]:
    """Cut tool-call arguments into several fragments (at least two when long enough)."""
    if not arguments:
        return ("",)
    step = ARGUMENT_FRAGMENT_CHARS
    return tuple(arguments[i : i + step] for i in range(0, len(arguments), step))


def default_text(view: RequestView) -> str:
    """A plausible reply; `[[words=N]]` in the last user message asks for about N tokens."""
    match = WORDS_DIRECTIVE.search(view.last_user_text)
    count = min(int(match.group(1)), MAX_WORDS) if match else DEFAULT_WORDS
    seed = int.from_bytes(hashlib.blake2b(view.last_user_text.encode(), digest_size=4).digest(), "big")
    words = [VOCABULARY[(seed + i * 7) % len(VOCABULARY)] for i in range(count)]
    if words:
        words[0] = words[0].capitalize()
    return " ".join(words) + ("." if words else "")


def build_plan(
    view: RequestView,
    turn: Turn | None,
    *,
    response_id: str,
    chunk_tokens: int,
    ttft_ms: float,
    token_delay_ms: float,
    call_id_prefix: str,
) -> ReplyPlan:
    """Turn a scripted turn (or the default mode, when `turn` is None) into a plan."""
    if turn is None:
        turn = Turn(text=default_text(view))
    text_tokens = split_tokens(turn.text) if turn.text else []
    reasoning_tokens = split_tokens(turn.reasoning) if turn.reasoning else []
    finish = turn.finish
    if view.max_tokens is not None and len(text_tokens) + len(reasoning_tokens) > view.max_tokens:
        # Honour the output limit the way providers do: cut the reply and report LENGTH.
        keep = max(0, view.max_tokens - len(reasoning_tokens))
        text_tokens = text_tokens[:keep]
        finish = finish or "length"
    calls = tuple(
        PlannedToolCall(
            id=f"{call_id_prefix}{response_id[-14:]}_{i}" if c.id is None else c.id,
            name=c.name,
            arguments=c.arguments_json(),
            fragments=fragments(c.arguments_json()),
        )
        for i, c in enumerate(turn.tool_calls)
    )
    if finish is None:
        finish = "tool_calls" if calls else "stop"
    call_tokens = sum(len(c.fragments) + 1 for c in calls)
    usage = _usage(
        turn.usage, view, len(text_tokens) + len(reasoning_tokens) + call_tokens, len(reasoning_tokens)
    )
    signature = ""
    if reasoning_tokens:
        signature = "sig_" + hashlib.sha256(turn.reasoning.encode()).hexdigest()[:32]
    return ReplyPlan(
        response_id=response_id,
        model=view.model,
        reasoning_chunks=chunk(reasoning_tokens, chunk_tokens),
        text_chunks=chunk(text_tokens, chunk_tokens),
        tool_calls=calls,
        finish=finish,
        usage=usage,
        ttft_ms=ttft_ms if turn.ttft_ms is None else turn.ttft_ms,
        token_delay_ms=token_delay_ms if turn.token_delay_ms is None else turn.token_delay_ms,
        signature=signature,
        fault=turn.fault,
        gate=turn.gate,
    )


def _usage(override: ScriptedUsage | None, view: RequestView, output: int, reasoning: int) -> Usage:
    estimated_input = max(1, view.input_chars // 4)
    if override is None:
        return Usage(input_tokens=estimated_input, output_tokens=output, reasoning_tokens=reasoning)
    return Usage(
        input_tokens=estimated_input if override.input_tokens is None else override.input_tokens,
        output_tokens=output if override.output_tokens is None else override.output_tokens,
        reasoning_tokens=reasoning if override.reasoning_tokens is None else override.reasoning_tokens,
        cache_read_tokens=override.cache_read_tokens,
        cache_write_tokens=override.cache_write_tokens,
    )
