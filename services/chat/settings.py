"""Chat service settings, parsed once from the environment into a frozen dataclass."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from services.common.settings import SettingsError


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ChatSettings:
    """Tuning of the chat workers and event streams."""

    # Chats one replica runs at once.
    max_concurrent_chats: int = 64
    # How long a claimed chat stays ours without a renewal.
    lease_seconds: float = 30.0
    # How often all our leases are renewed (in one statement); must be well under lease_seconds.
    renew_interval_seconds: float = 10.0
    # Fallback poll for pending chats when a notification was missed.
    poll_interval_seconds: float = 2.0
    # How often expired leases are swept back to PENDING.
    sweep_interval_seconds: float = 5.0
    # Model steps (generations) per turn before the turn ends with a message.
    step_limit: int = 200
    # Events kept per chat in the in-flight buffer (Redis stream or in-process).
    event_buffer_size: int = 2000
    # Events a subscriber may fall behind before it is dropped.
    subscriber_queue_size: int = 1000
    # Deltas are coalesced for at most this long before they are sent.
    delta_flush_ms: int = 50
    # Per-tool-call upper bound passed to toolexec.
    tool_timeout_seconds: float = 300.0
    # Queue capacity per chat.
    max_queued_messages: int = 20
    # Run workers in this process (a replica can serve the API only).
    run_workers: bool = True
    # Log each step's wall time as a JSON line (logger agentplane.chat.steps); the loop benchmark reads it.
    step_log: bool = False
    worker_id: str = field(default_factory=_default_worker_id)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ChatSettings:
        """Parse ``AGENTPLANE_CHAT_*`` variables (see docs/chat.md)."""
        env = os.environ if environ is None else environ
        base = cls()
        return replace(
            base,
            max_concurrent_chats=_int(env, "AGENTPLANE_CHAT_MAX_CONCURRENT", base.max_concurrent_chats),
            lease_seconds=_float(env, "AGENTPLANE_CHAT_LEASE_SECONDS", base.lease_seconds),
            renew_interval_seconds=_float(
                env, "AGENTPLANE_CHAT_RENEW_INTERVAL_SECONDS", base.renew_interval_seconds
            ),
            poll_interval_seconds=_float(
                env, "AGENTPLANE_CHAT_POLL_INTERVAL_SECONDS", base.poll_interval_seconds
            ),
            sweep_interval_seconds=_float(
                env, "AGENTPLANE_CHAT_SWEEP_INTERVAL_SECONDS", base.sweep_interval_seconds
            ),
            step_limit=_int(env, "AGENTPLANE_CHAT_STEP_LIMIT", base.step_limit),
            event_buffer_size=_int(env, "AGENTPLANE_CHAT_EVENT_BUFFER", base.event_buffer_size),
            subscriber_queue_size=_int(env, "AGENTPLANE_CHAT_SUBSCRIBER_QUEUE", base.subscriber_queue_size),
            delta_flush_ms=_int(env, "AGENTPLANE_CHAT_DELTA_FLUSH_MS", base.delta_flush_ms),
            run_workers=(env.get("AGENTPLANE_CHAT_RUN_WORKERS", "1").strip() not in ("0", "false", "no")),
            step_log=env.get("AGENTPLANE_CHAT_STEP_LOG", "").strip().lower() in ("1", "true", "yes"),
            worker_id=env.get("AGENTPLANE_CHAT_WORKER_ID", "").strip() or base.worker_id,
        ).validated()

    def validated(self) -> ChatSettings:
        """Self, or SettingsError naming the bad variable."""
        if self.max_concurrent_chats < 1:
            raise SettingsError("AGENTPLANE_CHAT_MAX_CONCURRENT must be at least 1")
        if self.renew_interval_seconds <= 0 or self.renew_interval_seconds >= self.lease_seconds:
            raise SettingsError(
                "AGENTPLANE_CHAT_RENEW_INTERVAL_SECONDS must be positive"
                " and below AGENTPLANE_CHAT_LEASE_SECONDS"
            )
        if self.step_limit < 1:
            raise SettingsError("AGENTPLANE_CHAT_STEP_LIMIT must be at least 1")
        if self.poll_interval_seconds <= 0:
            raise SettingsError("AGENTPLANE_CHAT_POLL_INTERVAL_SECONDS must be positive")
        return self


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
