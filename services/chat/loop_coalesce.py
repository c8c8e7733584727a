"""Deltas of a streaming assistant message, coalesced.

A provider streams many small text and reasoning chunks; clients need them quickly but not one
event each. `Coalescer` builds the message's parts as the stream goes and emits the deltas at
most once per flush interval; what is still pending when the stream ends goes out with the
persisted message instead (see `finish`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2

Emit = Callable[[list[chat_pb2.ChatEvent]], Awaitable[None]]


class Coalescer:
    """Builds the parts of one assistant message from its stream and emits their deltas as
    `PartDelta` events, at most one emit per `flush_ms`."""

    def __init__(self, emit: Emit, message_id: str, flush_ms: int) -> None:
        self._emit = emit
        self._message_id = message_id
        self._flush_seconds = flush_ms / 1000
        self.parts: list[chat_pb2.ContentPart] = []
        self._pending: list[chat_pb2.ChatEvent] = []
        self._last_flush = 0.0
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _current(self, kind: str) -> tuple[int, chat_pb2.ContentPart]:
        if self.parts and self.parts[-1].WhichOneof("part") == kind:
            return len(self.parts) - 1, self.parts[-1]
        part = chat_pb2.ContentPart()
        if kind == "text":
            part.text.SetInParent()
        else:
            part.reasoning.SetInParent()
        self.parts.append(part)
        return len(self.parts) - 1, part

    async def text(self, text: str) -> None:
        index, part = self._current("text")
        part.text.text += text
        await self._add(index, "text", text)

    async def reasoning(self, delta: inference_pb2.ReasoningDelta) -> None:
        index, part = self._current("reasoning")
        part.reasoning.text += delta.text
        if delta.signature:
            part.reasoning.signature = delta.signature
        if delta.redacted_data:
            part.reasoning.redacted_data = delta.redacted_data
        if delta.text:
            await self._add(index, "reasoning", delta.text)

    def tool_call(self, call: inference_pb2.ToolCallPart) -> chat_pb2.ToolCallPart:
        part = chat_pb2.ContentPart(
            tool_call=chat_pb2.ToolCallPart(id=call.id, name=call.name, arguments_json=call.arguments_json)
        )
        self.parts.append(part)
        return part.tool_call

    async def _add(self, index: int, kind: str, text: str) -> None:
        if self._pending:
            prev = self._pending[-1].part_delta
            if prev.part_index == index and prev.WhichOneof("delta") == kind:
                setattr(prev, kind, getattr(prev, kind) + text)
            else:
                self._pending.append(self._delta(index, kind, text))
        else:
            self._pending.append(self._delta(index, kind, text))
        wait = self._flush_seconds - (time.monotonic() - self._last_flush)
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later(wait))

    def _delta(self, index: int, kind: str, text: str) -> chat_pb2.ChatEvent:
        delta = chat_pb2.PartDelta(message_id=self._message_id, part_index=index)
        setattr(delta, kind, text)
        return chat_pb2.ChatEvent(part_delta=delta)

    async def _flush_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            events, self._pending = self._pending, []
            self._last_flush = time.monotonic()
            await self._emit(events)

    async def finish(self) -> list[chat_pb2.ChatEvent]:
        """Stop the timer and hand over the deltas not sent yet.

        The caller publishes them with the message it persists next (one statement, seqs
        just before the message's), instead of paying a round trip of their own.
        """
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        async with self._lock:
            events, self._pending = self._pending, []
            return events
