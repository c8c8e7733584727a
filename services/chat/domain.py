"""The chat domain's value types, shared by the store, the worker and the agent loop.

The loop imports these instead of the store, so it can run against any `Store` (the real one
in Postgres or an in-memory fake in tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agentplane.chat.v1 import chat_pb2


class LeaseLost(Exception):
    """The run's fence no longer matches: another worker, an edit or a delete took the chat."""


@dataclass(frozen=True)
class Fence:
    """Identifies one run of a chat: the worker that owns it and the run generation."""

    worker_id: str
    generation: int


@dataclass(frozen=True)
class Claim:
    """A chat a worker just acquired; `info` is set when the claim also started the run."""

    chat_id: str
    fence: Fence
    info: RunInfo | None = None


@dataclass(frozen=True)
class RenewResult:
    """What one lease renewal learned about a worker's chats."""

    held: dict[str, Fence]
    interrupted: set[str]
    # Chats the worker owned in the database without running them, which the renewal handed back.
    handed_back: set[str] = field(default_factory=set)


@dataclass
class RunInfo:
    """What a run needs to know about its chat."""

    chat_id: str
    owner_id: str
    model_config_id: str
    workspace_id: str
    # The workspace's AGENTS.md as cached on the chat row (None: not read yet).
    agents_md: str | None
    # A reply an earlier run streamed deltas of and never persisted (its message id): the run
    # announces it discarded before it generates anything.
    abandoned_reply: str | None = None


@dataclass(frozen=True)
class StartedRun:
    """What starting a run returns: the chat's facts and when its first turn began.

    `turn_began` is `time.monotonic()` taken right after the start was committed, before its
    events were published: interrupt flags read after that moment are about this turn.
    """

    info: RunInfo
    turn_began: float


@dataclass(frozen=True)
class NewMessage:
    """A message a run is about to persist."""

    role: str
    parts: Sequence[chat_pb2.ContentPart]
    sender_id: str
    model_config_id: str = ""
    usage: chat_pb2.Usage | None = None
    runtime_ms: int = 0
    visibility: int = chat_pb2.VISIBILITY_BOTH
