"""Two toolexec replicas on one database: a workspace's agent connected to replica A serves calls
that arrive at replica B (relayed over `AgentRelayService`), and B shows the agent as connected.

Each replica has its own workspaces directory (each binds its own agent socket there).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc.aio
import pytest
from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2

from services.common.settings import Settings
from services.toolexec import server as toolexec_server
from services.toolexec.agent_hub import AgentLink
from services.toolexec.agent_store import AgentInfo
from services.toolexec.settings import ToolexecSettings
from tests.helpers import kill_agents, wait_until
from tests.toolexec.conftest import StaticTemplates, Toolexec, call_request, ws_path, ws_read

pytestmark = pytest.mark.timeout(90)


def _touch(path: str) -> None:
    Path(path).touch()


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


@pytest.fixture
async def replica_b(
    settings: Settings, make_token: Callable[..., str], tmp_path: Path
) -> AsyncIterator[Toolexec]:
    """A second toolexec on the same database, with a workspaces dir of its own."""
    path = tmp_path / "replica-b-workspaces"
    path.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o755)
    tx_settings = ToolexecSettings(workspaces_dir=str(path))
    templates = StaticTemplates()
    server = await toolexec_server.start(settings, toolexec_settings=tx_settings, templates=templates)
    channels: list[grpc.aio.Channel] = []
    try:
        yield Toolexec(server, str(path), make_token, templates, channels)
    finally:
        for channel in channels:
            await channel.close()
        await server.stop(0)
        kill_agents(str(path))


async def _connected_on(tx: Toolexec, ws: str) -> None:
    """Wait until the agent is connected to `tx` and Postgres says so (how other replicas find it)."""

    async def link_and_record() -> tuple[AgentLink | None, AgentInfo | None]:
        return tx.server.hub.get(ws), await tx.server.agents.get(ws)

    _, info = await wait_until(
        link_and_record,
        until=lambda both: (
            both[0] is not None
            and both[1] is not None
            and both[1].connected
            and both[1].connection_id == both[0].connection_id
        ),
        timeout=20,
        what="the agent to connect to its replica, as Postgres records",
    )
    assert info is not None and info.replica_id == tx.server.replica_id


async def test_calls_at_replica_b_run_on_the_agent_connected_to_a(
    toolexec: Toolexec, replica_b: Toolexec
) -> None:
    a, b = toolexec, replica_b
    assert a.server.replica_id != b.server.replica_id and a.server.address != b.server.address
    ws = await a.create(name="on-a")
    await _connected_on(a, ws)
    stub_b = b.stub()

    wrote = await stub_b.CallTool(
        call_request(ws, "write_file", {"path": "hello.txt", "content": "hello from B\n"})
    )
    assert not wrote.is_error, wrote.content
    # The file is in A's workspace: the call ran on A's agent, not anywhere on B.
    assert ws_read(a, ws, "hello.txt") == "hello from B\n"
    assert not _exists(ws_path(b, ws))

    cat = await stub_b.CallTool(call_request(ws, "execute", {"command": "cat hello.txt; hostname"}))
    assert not cat.is_error, cat.content
    info = json.loads(cat.structured_json)
    assert info["exit_code"] == 0 and info["output"] == "hello from B\nworkspace\n", info

    read = await stub_b.CallTool(call_request(ws, "read_file", {"path": "hello.txt"}))
    assert not read.is_error and "hello from B" in read.content

    # Background processes live in the agent; B reaches them through A too.
    bg = await stub_b.CallTool(
        call_request(ws, "execute", {"command": "echo bg-out", "run_in_background": True})
    )
    process_id = json.loads(bg.structured_json)["process_id"]
    out = await wait_until(
        lambda: stub_b.CallTool(call_request(ws, "process_output", {"process_id": process_id})),
        until=lambda out: not json.loads(out.structured_json).get("running", True),
        timeout=20,
        what="the background process to finish",
    )
    assert "bg-out" in out.content, out.content

    # B never held the agent's connection, yet shows it connected (from the shared record).
    assert b.server.hub.get(ws) is None
    got = await stub_b.GetWorkspace(toolexec_service_pb2.GetWorkspaceRequest(workspace_id=ws))
    assert got.workspace.state == toolexec_pb2.WORKSPACE_STATE_READY
    assert got.workspace.agent.connected and got.workspace.agent.version
    assert got.workspace.driver == "local"


async def test_relayed_call_survives_agent_reconnect_on_the_holding_replica(
    toolexec: Toolexec, replica_b: Toolexec
) -> None:
    a, b = toolexec, replica_b
    ws = await a.create(name="on-a")
    await _connected_on(a, ws)
    runs = ws_path(a, ws, "runs.log")
    command = "echo run >> runs.log; while [ ! -e gate ]; do sleep 0.02; done; echo relayed-done"
    in_flight = asyncio.ensure_future(
        b.stub().CallTool(call_request(ws, "execute", {"command": command, "timeout_seconds": 60}))
    )
    await wait_until(
        lambda: _read(runs),
        until=lambda text: text == "run\n",
        timeout=20,
        what="the relayed command to start",
    )
    link = a.server.hub.get(ws)
    assert link is not None
    link.close("test: drop the agent's connection to A")
    await wait_until(
        lambda: (now := a.server.hub.get(ws)) is not None and now.connection_id != link.connection_id,
        timeout=20,
        what="the agent to reconnect to A",
    )
    assert not in_flight.done()
    _touch(ws_path(a, ws, "gate"))
    response = await asyncio.wait_for(in_flight, 30)
    info = json.loads(response.structured_json)
    assert not response.is_error and info["exit_code"] == 0 and info["output"] == "relayed-done\n", info
    assert _read(runs) == "run\n"
