"""Tracing end to end: the services run in-process with tracing configured the way production
configures it (the standard OTLP variables) and export to a stand-in OTLP collector (a gRPC
TraceService in the test); the workspace agent is a real external agent process exporting to the
same collector. One turn with a tool call must be one trace, spanning chat, inference (and its
provider request), toolexec and the agent, each span the child of the right one. Log lines
written inside a span carry its ids. Off (the default), nothing of it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from agentplane.chat.v1 import chat_pb2
from agentplane.chat.v1 import chat_service_pb2 as cs
from agentplane.toolexec.v1 import toolexec_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.common import logs, tracing
from services.common.client import outgoing_metadata
from services.common.server import default_interceptors
from services.common.settings import Settings
from services.common.tracing_interceptor import TracingInterceptor
from services.simulator.script import Script
from tests.chat.conftest import Stack, start_stack, stop_stack, text
from tests.helpers import deployment_keys, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


@dataclass
class Span:
    """One received span, flattened."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


@dataclass
class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A stand-in OTLP/gRPC collector: keeps every span it is sent."""

    spans: list[Span] = field(default_factory=list)
    port: int = 0

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        Span(
                            service,
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            {a.key: _value(a.value) for a in s.attributes},
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    received = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    received.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield received
    finally:
        await server.stop(0)


OTEL_ENV = {
    "OTEL_EXPORTER_OTLP_INSECURE": "true",
    # Export batches every 50 ms instead of every 5 s: the test waits for them.
    "OTEL_BSP_SCHEDULE_DELAY": "50",
}


@pytest.fixture
async def traced_stack(
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    make_token: Callable[..., str],
    workspaces_dir: str,
) -> AsyncIterator[Stack]:
    """The services with tracing on (configured before they are built, as `run_service` does)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    for key, value in OTEL_ENV.items():
        monkeypatch.setenv(key, value)
    assert tracing.configure("test")
    try:
        stack = await start_stack(settings, make_token, workspaces_dir)
        try:
            yield stack
        finally:
            await stop_stack(stack)
    finally:
        # Flushes what is batched (from a thread: the collector answers on this event loop).
        await asyncio.to_thread(tracing.shutdown)


@contextlib.contextmanager
def _agent(url: str, workspace_id: str, token: str, tmp: Path, collector: Collector) -> Iterator[Path]:
    """A real external workspace agent process that exports its spans to `collector`; its root."""
    root, state = tmp / "root", tmp / "state"
    root.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}",
        "AGENTPLANE_AGENT_TOKEN": token,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        **OTEL_ENV,
    }
    argv = [sys.executable, "-m", "services.agent", "--url", url, "--workspace", workspace_id]
    argv += ["--root", str(root), "--state-dir", str(state)]
    log_path = tmp / "agent.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    try:
        yield root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def _json_log_lines(logger: str) -> Iterator[io.StringIO]:
    """The JSON lines `logger` writes inside the block (the production formatter)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter("chat"))
    target = logging.getLogger(logger)
    previous = target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        yield out
    finally:
        target.removeHandler(handler)
        target.setLevel(previous)


async def test_one_turn_with_a_tool_call_is_one_trace(
    traced_stack: Stack, collector: Collector, tmp_path: Path
) -> None:
    stack = traced_stack
    toolexec = stack.toolexec()
    created = await toolexec.CreateWorkspace(
        toolexec_service_pb2.CreateWorkspaceRequest(name="traced", driver="external")
    )
    ws = created.workspace.id
    stack.sim.set_script(
        Script.from_data(
            {
                "conversations": [
                    {
                        "turns": [
                            {
                                "tool_calls": [
                                    {"name": "write_file", "arguments": {"path": "t.txt", "content": "x"}}
                                ]
                            },
                            {"text": "Wrote t.txt."},
                        ]
                    }
                ]
            }
        )
    )
    with _agent(stack.settings.address("toolexec"), ws, created.agent_token, tmp_path, collector) as root:
        toolexec_server = stack.servers[2]
        await wait_until(
            lambda: toolexec_server.hub.get(ws), what="the external agent to connect", timeout=20
        )
        with _json_log_lines("services.chat.loop") as lines:
            chat = (
                await stack.stub().CreateChat(
                    cs.CreateChatRequest(content=text("write t.txt"), workspace_id=ws)
                )
            ).chat
            await stack.wait_status(chat.id, chat_pb2.CHAT_STATUS_WAITING, within=30)
        assert (root / "t.txt").read_text() == "x"
        # The agent exports on its own schedule: wait for its span of the call.
        await wait_until(
            lambda: [s for s in collector.spans if s.name == "agent write_file"],
            what="the agent's span of write_file",
            timeout=20,
        )
    await asyncio.to_thread(tracing.flush)
    await wait_until(
        lambda: [s for s in collector.spans if s.name == "chat.turn"], what="the turn's span", timeout=10
    )

    turns = [
        s for s in collector.spans if s.name == "chat.turn" and s.attributes["agentplane.chat_id"] == chat.id
    ]
    assert len(turns) == 1, "one turn, one trace"
    turn = turns[0]
    assert turn.parent_id == "", "a turn starts its own trace"
    trace = [s for s in collector.spans if s.trace_id == turn.trace_id]
    by_id = {s.span_id: s for s in trace}
    # Correctly parented: every span but the root is the child of a span of the same trace.
    orphans = [(s.name, s.parent_id) for s in trace if s is not turn and s.parent_id not in by_id]
    assert not orphans, orphans

    def parent(s: Span) -> Span:
        return by_id[s.parent_id]

    def only(name: str) -> list[Span]:
        found = [s for s in trace if s.name == name]
        assert found, f"no {name} span in the trace: {sorted({s.name for s in trace})}"
        return found

    # chat -> inference -> provider, once per step (a tool call step, then the answer).
    generates = only("chat.generate")
    assert len(generates) == 2 and all(parent(g) is turn for g in generates)
    rpcs = only("agentplane.inference.v1.InferenceService/Generate")
    assert sorted(parent(r).span_id for r in rpcs) == sorted(g.span_id for g in generates)
    providers = only("chat sim-model")
    assert sorted(parent(p).span_id for p in providers) == sorted(r.span_id for r in rpcs)
    assert all(p.attributes["gen_ai.system"] == "openai_compatible" for p in providers)
    # chat -> toolexec -> workspace agent, for the model's call.
    (tool,) = [s for s in only("chat.tool") if s.attributes["agentplane.tool"] == "write_file"]
    assert parent(parent(tool)).span_id == turn.span_id and parent(tool).name == "chat.tools"
    (call_tool,) = [s for s in only("agentplane.toolexec.v1.ToolExecService/CallTool") if parent(s) is tool]
    (to_agent,) = [s for s in only("toolexec.agent write_file") if parent(s) is call_tool]
    (in_agent,) = only("agent write_file")
    assert parent(in_agent) is to_agent and in_agent.service == "agentplane-workspace-agent"
    # The agent's id of the call is the model's, scoped by the chat service.
    assert in_agent.attributes["agentplane.tool_call_id"].endswith(tool.attributes["agentplane.tool_call_id"])
    assert {s.service for s in trace} == {"agentplane-test", "agentplane-workspace-agent"}
    assert {s.attributes.get("rpc.service") for s in trace} >= {
        "agentplane.inference.v1.InferenceService",
        "agentplane.toolexec.v1.ToolExecService",
    }
    # The run's persists are the turn's too.
    assert all(parent(s) is turn for s in only("chat.persist"))

    # The loop's log lines of the turn carry the trace and span ids; the tool's names its step.
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    finished = [r for r in records if r["msg"] == "tool call finished"]
    assert len(finished) == 1 and finished[0]["trace_id"] == turn.trace_id
    assert finished[0]["span_id"] == tool.span_id
    assert (finished[0]["tool"], finished[0]["outcome"], finished[0]["step"]) == ("write_file", "ok", 1)
    ended = [r for r in records if r["msg"] == "turn finished"]
    assert ended and ended[0]["outcome"] == "done" and ended[0]["trace_id"] == turn.trace_id


def test_off_by_default_costs_nothing() -> None:
    assert tracing.endpoint_from({}) is None
    assert not tracing.configure("test", env={})
    assert not tracing.enabled()
    # No interceptor, no metadata, a shared null context, no ids in log lines.
    chain = default_interceptors(deployment_keys())
    assert not any(isinstance(i, TracingInterceptor) for i in chain)
    assert tracing.span("x") is tracing.span("y")
    with tracing.span("x"):
        assert not [k for k, _ in outgoing_metadata("token") if k == "traceparent"]
        record = logging.LogRecord("t", logging.INFO, "f", 1, "m", None, None)
        assert "trace_id" not in json.loads(logs.JsonFormatter("chat").format(record))
    carrier: dict[str, str] = {}
    tracing.inject(carrier)
    assert carrier == {}


def test_standard_variables_turn_it_on_or_keep_it_off() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert tracing.endpoint_from(endpoint) == "http://collector:4317"
    assert tracing.endpoint_from({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317"}) == "http://t:4317"
    assert tracing.endpoint_from({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.endpoint_from({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
