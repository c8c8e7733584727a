"""deploy/monitoring against the real services: run a chat with a tool call (one provider retry on
the way), a chat that fails, and a refused RPC (logged at DEBUG only); scrape every service's
metrics endpoint over HTTP; then every metric (and label matcher) the alert rules and the Grafana
dashboard use must be among what was scraped, the rules file must have the shape Prometheus
loads, every PromQL expression must parse, and docs/operations.md must describe every exported
metric and every alert.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import prometheus_client
import promql_parser
import pytest
import yaml
from agentplane.chat.v1 import chat_pb2
from agentplane.chat.v1 import chat_service_pb2 as cs
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import MetricsServer, start_metrics_server
from services.common.settings import Settings
from services.config.testing import seed_provider_and_model
from services.simulator.script import Script
from tests.chat.conftest import Stack, start_stack, stop_stack, text

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "monitoring" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"
# Labels Prometheus adds to every scraped series (never exported by the services themselves).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service_name"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
DURATION = re.compile(r"^\d+[smhdw]$")
SEVERITIES = {"critical", "warning"}
pytestmark = pytest.mark.timeout(120)


@dataclass
class Scrape:
    """What the metrics endpoints served: sample names with the label names seen on them."""

    text: str = ""
    families: set[str] = field(default_factory=set)
    samples: dict[str, set[str]] = field(default_factory=dict)
    values: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, exposition: str) -> None:
        self.text += exposition
        for family in text_string_to_metric_families(exposition):
            self.families.add(family.name)
            for sample in family.samples:
                self.samples.setdefault(sample.name, set()).update(sample.labels)
                self.values.append((sample.name, dict(sample.labels), sample.value))

    def has(self, name: str) -> bool:
        # A counter family is named without `_total`; its samples carry it.
        return name in self.samples or name in self.families

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of `name` with `labels` (others free); None when there is none."""
        found = [v for n, have, v in self.values if n == name and labels.items() <= have.items()]
        return sum(found) if found else None


def _fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _selectors(node: Any) -> Iterator[Any]:
    """Every vector selector of a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    elif isinstance(node, promql_parser.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _selectors(node.lhs)
        yield from _selectors(node.rhs)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from _selectors(node.expr)
        if node.param is not None:
            yield from _selectors(node.param)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from _selectors(arg)
    elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        yield from _selectors(node.expr)


def _parse(expr: str) -> Any:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return promql_parser.parse(expr)


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
    ]


@pytest.fixture
async def stack(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str
) -> AsyncIterator[Stack]:
    """The four services and the simulator (tests/chat/conftest.py's stack)."""
    running = await start_stack(settings, make_token, workspaces_dir)
    try:
        yield running
    finally:
        await stop_stack(running)


async def _traffic(stack: Stack) -> tuple[str, str, str]:
    """A turn with a tool call (its first generation retried once), a failed turn, a refused RPC:
    the ids of the chats and the workspace."""
    stack.sim.set_script(
        Script.from_data(
            {
                "conversations": [
                    {
                        "match": "write the notes",
                        "turns": [
                            {
                                "tool_calls": [
                                    {"name": "write_file", "arguments": {"path": "n.txt", "content": "x\n"}}
                                ],
                                "fault": {"kind": "rate_limit", "retry_after": 0.05},
                            },
                            {"text": "Wrote n.txt."},
                        ],
                    },
                    {
                        "match": "fail",
                        "turns": [{"text": "never", "fault": {"kind": "invalid_key", "times": 9}}],
                    },
                ]
            }
        )
    )
    # A priced model, so the turn has a cost.
    _, priced = await seed_provider_and_model(
        stack.settings.address("config"),
        stack.make_token("admin", "admin"),
        base_url=stack.sim.openai_base_url,
        api_key="sk-test",
        model_name="priced-model",
        pricing={"input_micros_per_million": 3_000_000, "output_micros_per_million": 15_000_000},
        make_default=False,
    )
    stub = stack.stub()
    ws = await stack.workspace()
    chat = (
        await stub.CreateChat(
            cs.CreateChatRequest(content=text("write the notes"), workspace_id=ws, model_config_id=priced)
        )
    ).chat
    failing = (await stub.CreateChat(cs.CreateChatRequest(content=text("fail")))).chat
    await stack.wait_status(chat.id, chat_pb2.CHAT_STATUS_WAITING, within=30)
    await stack.wait_status(failing.id, chat_pb2.CHAT_STATUS_ERROR, within=30)
    return str(chat.id), str(failing.id), ws


async def _refused(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A GetChat of a chat that does not exist: NOT_FOUND, counted, and logged at DEBUG only (an
    answer about the request, not a problem of the service)."""
    caplog.set_level(logging.DEBUG, logger="services.common.interceptors")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub().GetChat(cs.GetChatRequest(chat_id="00000000-0000-0000-0000-000000000000"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    failed = [r for r in caplog.records if r.getMessage().startswith("rpc failed")]
    assert [(r.levelno, getattr(r, "code", None)) for r in failed] == [(logging.DEBUG, "NOT_FOUND")]


async def _scrape_one(registry: prometheus_client.CollectorRegistry) -> Scrape:
    """One registry's endpoint alone (the global registry also holds series of earlier tests'
    in-process servers, which a sum over every endpoint would add in)."""
    server = start_metrics_server(0, "127.0.0.1", registry)
    try:
        scrape = Scrape()
        scrape.add(await asyncio.to_thread(_fetch, server.port))
        return scrape
    finally:
        server.stop()


async def _scrape(stack: Stack) -> Scrape:
    """Every service's metrics endpoint, fetched over HTTP from a thread as Prometheus would (the
    database gauges run their query on this event loop meanwhile)."""
    config = stack.servers[0]
    # Each registry once: servers may share one (then a second scrape would count its series twice).
    candidates = [stack.chat.metrics.registry, config.metrics.registry, prometheus_client.REGISTRY]
    registries = list({id(r): r for r in candidates}.values())
    servers: list[MetricsServer] = [start_metrics_server(0, "127.0.0.1", r) for r in registries]
    try:
        scrape = Scrape()
        for server in servers:
            scrape.add(await asyncio.to_thread(_fetch, server.port))
        return scrape
    finally:
        for server in servers:
            server.stop()


async def test_exported_metrics_cover_rules_dashboard_and_guide(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    chat_id, failing_id, ws = await _traffic(stack)
    await _refused(stack, caplog)
    scraped = await _scrape(stack)

    # What the traffic did shows.
    assert (scraped.value("agentplane_chat_turns_total", outcome="done") or 0) >= 1
    assert scraped.value("agentplane_chat_turn_errors_total", reason="PROVIDER_AUTH_FAILED") == 1
    assert scraped.value("agentplane_chat_tool_calls_total", tool="write_file", outcome="ok") == 1
    assert (scraped.value("agentplane_toolexec_tool_calls_total", tool="write_file", outcome="ok") or 0) >= 1
    assert scraped.value("agentplane_inference_retries_total", reason="RATE_LIMITED") == 1
    assert scraped.value("agentplane_inference_provider_requests_total", outcome="retried") == 1
    assert (scraped.value("agentplane_inference_tokens_total", kind="output") or 0) > 0
    assert (scraped.value("agentplane_inference_cost_dollars_total", model="priced-model") or 0) > 0
    assert (scraped.value("agentplane_chat_time_to_first_delta_seconds_count") or 0) >= 2
    assert (scraped.value("agentplane_chat_step_phase_seconds_count", phase="tools") or 0) >= 1
    assert scraped.value("agentplane_rpc_requests_total", method="GetChat", code="NOT_FOUND") == 1
    # The database gauges, computed by one query on this scrape.
    assert (scraped.value("agentplane_chat_chats", status="waiting") or 0) >= 1
    assert scraped.value("agentplane_chat_chats", status="error") == 1
    assert scraped.value("agentplane_chat_stuck_running") == 0
    assert (scraped.value("agentplane_toolexec_workspaces", state="ready", driver="local") or 0) >= 1
    chat_only = await _scrape_one(stack.chat.metrics.registry)
    assert chat_only.value("agentplane_health_dependency_up", service="chat", dependency="database") == 1
    assert scraped.value("agentplane_chat_runs") == 0
    # No _created series, and no chat, workspace or user id in any label.
    assert "_created" not in scraped.text
    for value in (chat_id, failing_id, ws, "alice"):
        assert value not in scraped.text

    # Every metric (and label matcher) of the rules and the dashboard is exported.
    exprs = [(rule["alert"], rule["expr"]) for rule in _alert_rules()] + _dashboard_exprs()
    assert len(exprs) > 40
    missing: list[str] = []
    for where, expr in exprs:
        for selector in _selectors(_parse(expr)):
            name = selector.name
            if not scraped.has(name):
                missing.append(f"{where}: {name}")
                continue
            exported = scraped.samples.get(name, set())
            for matcher in selector.matchers.matchers:
                if matcher.name not in exported | TARGET_LABELS:
                    missing.append(f"{where}: {name} has no label {matcher.name} (has {sorted(exported)})")
    assert not missing, "used but not exported:\n" + "\n".join(missing)

    # The operations guide describes every exported metric and every alert.
    guide = OPERATIONS.read_text()
    exported_names = {name for name in scraped.families if name.startswith("agentplane_")}
    assert len(exported_names) > 40
    undocumented = sorted(
        name
        for name in exported_names
        # Counters are documented with the `_total` Prometheus shows.
        if f"`{name}`" not in guide and f"`{name}_total`" not in guide
    )
    assert not undocumented, f"docs/operations.md does not describe: {undocumented}"
    for rule in _alert_rules():
        assert f"`{rule['alert']}`" in guide, f"docs/operations.md does not explain {rule['alert']}"


def test_alert_rules_have_the_shape_prometheus_loads() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    names: set[str] = set()
    for group in document["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and group["rules"], group
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] not in names, f"alert {rule['alert']} defined twice"
            names.add(rule["alert"])
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert DURATION.match(rule.get("for", "0m")), rule
            assert rule["labels"]["severity"] in SEVERITIES, rule
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
            _parse(rule["expr"])
            # Templates in annotations only name labels the expression keeps.
            for label in re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])):
                assert label in rule["expr"], f"{rule['alert']} annotates with {label}, not in its expr"
    # The alerts the operations guide promises.
    for alert in (
        "AgentplaneChatsStuckRunning",
        "AgentplaneTurnErrorRateHigh",
        "AgentplaneProviderErrors",
        "AgentplaneProviderRetriesHigh",
        "AgentplaneTimeToFirstDeltaSlow",
        "AgentplaneLeaseRenewalFailures",
        "AgentplaneLeasesSwept",
        "AgentplaneNoConnectedAgents",
        "AgentplaneDatabaseUnavailable",
    ):
        assert alert in names


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            _parse(target["expr"])
