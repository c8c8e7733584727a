"""Prometheus collectors of the chat service: turns, steps and their phases, tool calls, leases,
runs, compactions, sub-agents, and the chats' state read from the database on scrape.

Labels are bounded: outcomes and phases are fixed sets, tool names are the workspace's tools
(anything else counts as ``unknown``), error reasons are the services' ErrorReason names. No
chat, user or workspace id is ever a label. docs/operations.md lists every metric.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from services.common.metrics import LATENCY_BUCKETS, CachedStateCollector, PerRegistry

TURN_OUTCOMES = ("done", "interrupted", "failed", "lost", "error")
STEP_OUTCOMES = ("tool_calls", "answer", "interrupted", "failed")
STEP_PHASES = ("generate", "tools", "persist")
TOOL_OUTCOMES = ("ok", "error", "interrupted")
COMPACTION_TRIGGERS = ("threshold", "overflow", "manual")
COMPACTION_OUTCOMES = ("ok", "failed", "interrupted")
SUBAGENT_OUTCOMES = ("completed", "failed", "interrupted")
CHAT_STATUSES = ("pending", "running", "waiting", "error")
UNKNOWN_TOOL = "unknown"
# A RUNNING chat whose lease expired this long ago (or that has no worker) is stuck: the sweep
# runs every few seconds and would have returned it to PENDING.
STUCK_AFTER_SECONDS = 60.0
STEP_BUCKETS = (0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)

STATE_QUERY = """
SELECT status,
       count(*) AS chats,
       count(*) FILTER (WHERE status = 'running'
           AND (worker_id IS NULL OR lease_expires_at < now() - make_interval(secs => %(stuck)s))) AS stuck,
       coalesce(extract(epoch FROM now() - min(updated_at) FILTER (WHERE status = 'pending')), 0)
           AS oldest_pending_seconds,
       (SELECT count(*) FROM chat_queued_messages) AS queued
FROM chat_chats
GROUP BY status
"""


@dataclass(frozen=True)
class ChatState:
    """What one state query found."""

    by_status: dict[str, int]
    stuck_running: int
    oldest_pending_seconds: float
    queued_messages: int


class ChatMetrics(PerRegistry):
    """The chat collectors registered in one registry (one set per registry, like `RpcMetrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.turns = Counter(
            "agentplane_chat_turns",
            "Turns ended, by outcome: done (answered), interrupted, failed (the chat is in ERROR), lost "
            "(the lease was taken away), error (a bug in the loop).",
            ["outcome"],
            registry=registry,
        )
        self.turn_errors = Counter(
            "agentplane_chat_turn_errors",
            "Turns that left the chat in ERROR, by the error's reason.",
            ["reason"],
            registry=registry,
        )
        self.steps = Counter(
            "agentplane_chat_steps",
            "Model steps, by outcome: tool_calls, answer, interrupted, failed (the generation failed).",
            ["outcome"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "agentplane_chat_step_seconds",
            "Wall time of a model step: generate, persist, run the tool calls, persist their results.",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.step_phase_seconds = Histogram(
            "agentplane_chat_step_phase_seconds",
            "Time a step spent in each phase: generate (prompt and model stream), tools (the calls), "
            "persist (its database writes).",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.time_to_first_delta = Histogram(
            "agentplane_chat_time_to_first_delta_seconds",
            "From the start of a generation (building the prompt included) to the first output the "
            "chat service receives (text, reasoning or a tool call).",
            buckets=TTFD_BUCKETS,
            registry=registry,
        )
        self.tool_calls = Counter(
            "agentplane_chat_tool_calls",
            "Tool calls the model made, by tool and outcome (ok, error, interrupted).",
            ["tool", "outcome"],
            registry=registry,
        )
        self.tool_call_seconds = Histogram(
            "agentplane_chat_tool_call_seconds",
            "Duration of a tool call as the chat service saw it.",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compactions = Counter(
            "agentplane_chat_compactions",
            "Conversation summaries, by trigger (threshold, overflow, manual) and outcome.",
            ["trigger", "outcome"],
            registry=registry,
        )
        self.subagents = Counter(
            "agentplane_chat_subagents",
            "Sub-agent chats that ended, by outcome (counts once sub-agents exist).",
            ["outcome"],
            registry=registry,
        )
        self.lease_renewals = Counter(
            "agentplane_chat_lease_renewals",
            "Lease renewal statements of this replica, by outcome (ok, error).",
            ["outcome"],
            registry=registry,
        )
        self.leases_lost = Counter(
            "agentplane_chat_leases_lost",
            "Runs stopped because their lease was taken away (swept, edited, deleted).",
            registry=registry,
        )
        self.leases_swept = Counter(
            "agentplane_chat_leases_swept",
            "Chats whose expired lease this replica's sweep returned to PENDING.",
            registry=registry,
        )
        self.runs = Gauge("agentplane_chat_runs", "Chats this replica runs now.", registry=registry)
        self.run_capacity = Gauge(
            "agentplane_chat_run_capacity",
            "How many chats this replica runs at most (AGENTPLANE_CHAT_MAX_CONCURRENT).",
            registry=registry,
        )
        self.state = CachedStateCollector(_render_state)
        registry.register(self.state)
        # Every known label value exported from the start: rate() and alerts see a 0, not nothing.
        for outcome in TURN_OUTCOMES:
            self.turns.labels(outcome)
        for outcome in STEP_OUTCOMES:
            self.steps.labels(outcome)
        for phase in STEP_PHASES:
            self.step_phase_seconds.labels(phase)
        for trigger in COMPACTION_TRIGGERS:
            for outcome in COMPACTION_OUTCOMES:
                self.compactions.labels(trigger, outcome)
        for outcome in SUBAGENT_OUTCOMES:
            self.subagents.labels(outcome)
        for outcome in ("ok", "error"):
            self.lease_renewals.labels(outcome)
        # Resolved once: the loop observes these on every step.
        self.phase = {phase: self.step_phase_seconds.labels(phase) for phase in STEP_PHASES}
        self.step_outcome = {outcome: self.steps.labels(outcome) for outcome in STEP_OUTCOMES}
        self.turn_outcome = {outcome: self.turns.labels(outcome) for outcome in TURN_OUTCOMES}

    def watch_state(self, pool: AsyncConnectionPool[Any]) -> Any:
        """Compute the state gauges from `pool` on scrape (see `CachedStateCollector`); returns detach."""
        import asyncio

        async def load() -> ChatState:
            return await query_state(pool)

        return self.state.attach(asyncio.get_running_loop(), load)

    def tool_call(self, tool: str, outcome: str, seconds: float) -> None:
        """Count one finished tool call (`tool` already bounded by the caller)."""
        self.tool_calls.labels(tool, outcome).inc()
        self.tool_call_seconds.labels(tool).observe(seconds)


async def query_state(pool: AsyncConnectionPool[Any]) -> ChatState:
    """The chats by status, stuck runs, the oldest pending chat and queued messages: one statement."""
    async with pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(STATE_QUERY, {"stuck": STUCK_AFTER_SECONDS})
        rows = await cur.fetchall()
    by_status = dict.fromkeys(CHAT_STATUSES, 0)
    stuck = queued = 0
    oldest = 0.0
    for status, chats, stuck_n, oldest_s, queued_n in rows:
        by_status[str(status)] = int(chats)
        stuck += int(stuck_n)
        oldest = max(oldest, float(oldest_s))
        queued = int(queued_n)
    return ChatState(by_status, stuck, oldest, queued)


def _render_state(state: ChatState) -> Iterable[Metric]:
    chats = GaugeMetricFamily(
        "agentplane_chat_chats",
        "Chats by status, across the deployment (every chat replica reports the same: use max).",
        labels=["status"],
    )
    for status, n in sorted(state.by_status.items()):
        chats.add_metric([status], n)
    yield chats
    queue = GaugeMetricFamily(
        "agentplane_chat_queue_depth",
        "Work waiting across the deployment: pending_chats (runnable chats no worker has claimed) "
        "and queued_messages (messages queued behind a running turn).",
        labels=["queue"],
    )
    queue.add_metric(["pending_chats"], state.by_status.get("pending", 0))
    queue.add_metric(["queued_messages"], state.queued_messages)
    yield queue
    yield GaugeMetricFamily(
        "agentplane_chat_stuck_running",
        f"RUNNING chats with no worker or a lease expired over {STUCK_AFTER_SECONDS:g} s ago.",
        value=state.stuck_running,
    )
    yield GaugeMetricFamily(
        "agentplane_chat_oldest_pending_seconds",
        "Age of the oldest PENDING chat (0 when none): how long runnable work has waited.",
        value=state.oldest_pending_seconds,
    )


@dataclass
class StepTimer:
    """Time one step spent in each phase; the loop adds to it and records it when the step ends."""

    started: float = field(default_factory=time.monotonic)
    generate: float = 0.0
    tools: float = 0.0
    persist: float = 0.0

    def phases(self) -> Iterator[tuple[str, float]]:
        """(phase, seconds) of each phase."""
        yield "generate", self.generate
        yield "tools", self.tools
        yield "persist", self.persist


# The loop's metrics when nobody wires any in (tests of the loop, CompactChat): counted, not exported.
UNEXPORTED = ChatMetrics(CollectorRegistry())
