"""Prometheus collectors of toolexec: tool calls, connected workspace agents, and workspaces by
state (read from the database on scrape). Labels are bounded: tool names are the workspace tools
(anything else counts as ``unknown``); no workspace or user id is a label."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from services.agent.tools.base import ToolResult
from services.common.metrics import LATENCY_BUCKETS, CachedStateCollector, PerRegistry
from services.toolexec.tools.definitions import TOOLS_BY_NAME

UNKNOWN_TOOL = "unknown"
# Error codes of results that say where the call went wrong (see router.py); other errors are the
# tool's own ("error").
OUTCOME_BY_ERROR_CODE = {"workspace_offline": "offline", "outcome_unknown": "outcome_unknown"}
TOOL_OUTCOMES = ("ok", "error", "offline", "outcome_unknown", "replayed")
STATE_QUERY = "SELECT state, driver, count(*) FROM toolexec_workspaces GROUP BY state, driver"


class ToolexecMetrics(PerRegistry):
    """The toolexec collectors registered in one registry (one set per registry, like `RpcMetrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.tool_calls = Counter(
            "agentplane_toolexec_tool_calls",
            "CallTool answers, by tool and outcome: ok, error (the tool failed), offline (no agent "
            "connected in time), outcome_unknown (the agent's connection was lost mid-call), replayed "
            "(answered from the ledger).",
            ["tool", "outcome"],
            registry=registry,
        )
        self.tool_call_seconds = Histogram(
            "agentplane_toolexec_tool_call_seconds",
            "Time from CallTool to its answer, by tool.",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.connected_agents = Gauge(
            "agentplane_toolexec_connected_agents",
            "Workspace agents connected to this replica now.",
            registry=registry,
        )
        self.state = CachedStateCollector(_render_state)
        registry.register(self.state)

    def watch(self, pool: AsyncConnectionPool[Any], connected: Callable[[], int]) -> Callable[[], None]:
        """Report `connected()` agents and the workspaces in `pool` (on scrape); returns detach."""
        self.connected_agents.set_function(connected)

        async def load() -> dict[tuple[str, str], int]:
            async with pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(STATE_QUERY)
                return {(str(state), str(driver)): int(n) for state, driver, n in await cur.fetchall()}

        return self.state.attach(asyncio.get_running_loop(), load)

    def tool_call(self, name: str, result: ToolResult, replayed: bool, seconds: float) -> None:
        """Count one CallTool answer."""
        tool = name if name in TOOLS_BY_NAME else UNKNOWN_TOOL
        if replayed:
            outcome = "replayed"
        elif result.is_error:
            outcome = OUTCOME_BY_ERROR_CODE.get(str(result.structured.get("error", "")), "error")
        else:
            outcome = "ok"
        self.tool_calls.labels(tool, outcome).inc()
        self.tool_call_seconds.labels(tool).observe(seconds)


def _render_state(counts: dict[tuple[str, str], int]) -> Iterable[Metric]:
    family = GaugeMetricFamily(
        "agentplane_toolexec_workspaces",
        "Workspaces by state and driver, across the deployment (every replica reports the same: use max).",
        labels=["state", "driver"],
    )
    for (state, driver), n in sorted(counts.items()):
        family.add_metric([state, driver], n)
    # A deployment without workspaces still says so (alerts compare with these).
    if not counts:
        family.add_metric(["ready", "local"], 0)
    yield family
