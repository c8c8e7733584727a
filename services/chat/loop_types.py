"""The agent loop's interfaces: what it needs of the model, the tools, the prompts and the store.

`services.chat.loop` drives a run over these; the worker wires the real clients
(`services.chat.clients`, `ChatStore`) in, tests wire fakes (tests/chat/loopkit.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2

from services.chat.domain import Fence, NewMessage, StartedRun


class ModelError(Exception):
    """A generation failed after the inference service's retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ModelLimits:
    """What the loop needs to know about a model config."""

    model_config_id: str
    context_limit: int
    compaction_threshold_percent: int


@dataclass(frozen=True)
class ToolOutcome:
    """The result of one tool call."""

    content: str
    is_error: bool
    structured_json: str = ""
    duration_ms: int = 0


class Model(Protocol):
    """Streams one generation; raises ModelError on failure."""

    def generate(
        self, request: inference_service_pb2.GenerateRequest
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        """Stream the generation's events."""
        ...


class Tools(Protocol):
    """The workspace tools."""

    async def list_tools(self) -> list[inference_pb2.ToolDefinition]:
        """Tool definitions, passed to the model unchanged."""
        ...

    async def call(
        self, workspace_id: str, tool_call_id: str, name: str, arguments_json: str, *, user_id: str
    ) -> ToolOutcome:
        """Run one call (idempotent by tool_call_id) on behalf of `user_id`, the chat's owner."""
        ...


class Prompts(Protocol):
    """Deployment configuration read through the config client's cache."""

    async def model(self, model_config_id: str) -> ModelLimits:
        """The model config's limits."""
        ...

    async def system_prompt(self) -> str:
        """The deployment system prompt."""
        ...

    async def user_prompt(self, user_id: str) -> str:
        """The user's own prompt ('' when none)."""
        ...


class Store(Protocol):
    """The fenced writes a run makes (implemented by ChatStore; tests/chat/loopkit.py has a fake).

    `start_run` and `finish_turn` say when a turn's start was committed: the loop counts an
    interrupt for that turn only when the renewal that saw it began after that moment (see
    `RunContext.interrupt`).
    """

    async def start_run(self, chat_id: str, fence: Fence) -> StartedRun: ...
    async def history(self, chat_id: str) -> list[chat_pb2.Message]: ...
    async def emit(self, chat_id: str, fence: Fence | None, events: Sequence[chat_pb2.ChatEvent]) -> None: ...
    async def persist(
        self,
        chat_id: str,
        fence: Fence | None,
        msg: NewMessage,
        *,
        pre_events: Sequence[chat_pb2.ChatEvent] = (),
        extra_events: Sequence[chat_pb2.ChatEvent] = (),
        message_id: str | None = None,
        guard_idle: bool = False,
        agents_md: str | None = None,
    ) -> chat_pb2.Message: ...
    async def finish_turn(self, chat_id: str, fence: Fence) -> float | None:
        """End the turn: None when the chat now waits; else a queued message began the next turn,
        and the answer is when that was committed (`time.monotonic()`, as `StartedRun.turn_began`)."""
        ...

    async def fail_run(self, chat_id: str, fence: Fence, reason: str, message: str) -> None: ...
    async def discard_reply(
        self,
        chat_id: str,
        fence: Fence,
        message_id: str,
        *,
        reason: str,
        retrying: bool,
        then: Sequence[chat_pb2.ChatEvent] = (),
    ) -> None:
        """Announce that the reply streamed as deltas of `message_id` is never persisted (a
        durable `reply_discarded` event), then `then`; see services/chat/loop_replies.py."""
        ...


@dataclass
class LoopConfig:
    """Knobs of the loop."""

    step_limit: int = 200
    delta_flush_ms: int = 50
    sender_id: str = "service:chat"
    # A provider stream that breaks mid-reply is generated again this many times per step, after
    # stream_retry_delay_ms, doubling (services/chat/loop_replies.py).
    stream_retries: int = 2
    stream_retry_delay_ms: int = 500
