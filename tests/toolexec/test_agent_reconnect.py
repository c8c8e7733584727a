"""An agent's connection dropped during an `execute`, then restored: the command ran once and its
result arrives on the original CallTool. A workspace whose agent never connects gets an
"offline" error result within the bounded wait, and the ledger records nothing for it.

Real toolexec servers, real agents (the local driver's bwrap sandbox); every wait is a loop on
observable state or a gate file the test creates.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc.aio
import psycopg
import pytest
from agentplane.toolexec.v1 import toolexec_service_pb2

from services.common.settings import Settings
from services.toolexec import server as toolexec_server
from services.toolexec.agent_hub import AgentHub, AgentLink
from services.toolexec.agent_store import AgentInfo
from services.toolexec.settings import ToolexecSettings
from tests.helpers import kill_agents, wait_until
from tests.toolexec.conftest import (
    StaticTemplates,
    Toolexec,
    call_request,
    ws_path,
    ws_read,
)

pytestmark = pytest.mark.timeout(90)


async def _drop_and_wait_for_reconnect(hub: AgentHub, ws: str) -> None:
    """Close the agent's link from the server side; wait until the agent is connected again."""
    link = hub.get(ws)
    assert link is not None, "the agent must be connected here"
    old = link.connection_id
    link.close("test: drop the agent's connection")

    def reconnected() -> bool:
        now = hub.get(ws)
        return now is not None and now.connection_id != old

    # The agent notices the end of its stream and dials again by itself (jittered backoff).
    await wait_until(reconnected, timeout=20, what="the agent to reconnect")


def _touch(path: str) -> None:
    Path(path).touch()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


@asynccontextmanager
async def _toolexec_with(
    settings: Settings, make_token: Callable[..., str], tx_settings: ToolexecSettings
) -> AsyncIterator[Toolexec]:
    """A toolexec of its own settings (as the `toolexec` fixture builds it); its agents die after."""
    templates = StaticTemplates()
    server = await toolexec_server.start(settings, toolexec_settings=tx_settings, templates=templates)
    channels: list[grpc.aio.Channel] = []
    try:
        yield Toolexec(server, tx_settings.workspaces_dir, make_token, templates, channels)
    finally:
        for channel in channels:
            await channel.close()
        await server.stop(0)
        kill_agents(tx_settings.workspaces_dir)


async def test_connection_dropped_during_execute_runs_once_and_result_arrives(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    hub = toolexec.server.hub
    runs = ws_path(toolexec, ws, "runs.log")
    gate = ws_path(toolexec, ws, "gate")
    command = "echo run >> runs.log; while [ ! -e gate ]; do sleep 0.02; done; echo finished"
    request = call_request(ws, "execute", {"command": command, "timeout_seconds": 60}, "reconnect-1")
    in_flight = asyncio.ensure_future(stub.CallTool(request))
    await wait_until(
        lambda: _read(runs), until=lambda text: text == "run\n", timeout=20, what="the command to start"
    )

    await _drop_and_wait_for_reconnect(hub, ws)
    assert not in_flight.done(), "the call must wait for the command, not fail on the dropped link"

    # The new connection is what Postgres records for the workspace (how other replicas find it).
    async def recorded_and_live() -> tuple[AgentInfo | None, AgentLink | None]:
        return await toolexec.server.agents.get(ws), hub.get(ws)

    recorded, _ = await wait_until(
        recorded_and_live,
        until=lambda both: (
            both[0] is not None and both[1] is not None and both[0].connection_id == both[1].connection_id
        ),
        what="Postgres to record the new connection",
    )
    assert recorded is not None and recorded.connected

    _touch(gate)
    response = await asyncio.wait_for(in_flight, 30)
    assert not response.is_error, response.content
    info = json.loads(response.structured_json)
    assert info["exit_code"] == 0 and info["running"] is False, info
    assert info["output"] == "finished\n", info
    # It ran once: the re-sent call was answered by the run in progress, not run again.
    assert ws_read(toolexec, ws, "runs.log") == "run\n"

    # The ledger has the real result; a repeat of the id replays it and runs nothing.
    again = await stub.CallTool(request)
    assert again.replayed and again.structured_json == response.structured_json
    assert ws_read(toolexec, ws, "runs.log") == "run\n"


async def test_connection_dropped_twice_while_waiting(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    hub = toolexec.server.hub
    runs = ws_path(toolexec, ws, "runs.log")
    command = "echo run >> runs.log; while [ ! -e gate ]; do sleep 0.02; done; echo finished; exit 4"
    in_flight = asyncio.ensure_future(
        stub.CallTool(call_request(ws, "execute", {"command": command, "timeout_seconds": 60}))
    )
    await wait_until(
        lambda: _read(runs), until=lambda text: text == "run\n", timeout=20, what="the command to start"
    )
    for _ in range(2):
        await _drop_and_wait_for_reconnect(hub, ws)
        assert not in_flight.done()
    _touch(ws_path(toolexec, ws, "gate"))
    response = await asyncio.wait_for(in_flight, 30)
    info = json.loads(response.structured_json)
    assert not response.is_error and info["exit_code"] == 4 and info["output"] == "finished\n", info
    assert ws_read(toolexec, ws, "runs.log") == "run\n"


async def test_external_workspace_without_agent_is_offline_within_bounded_wait(
    settings: Settings, make_token: Callable[..., str], tmp_path: Path, database_url: str
) -> None:
    workspaces = tmp_path / "offline-workspaces"
    workspaces.mkdir()
    os.chmod(tmp_path, 0o755)
    tx_settings = ToolexecSettings(workspaces_dir=str(workspaces), offline_wait_seconds=0.5)
    async with _toolexec_with(settings, make_token, tx_settings) as tx:
        stub = tx.stub()
        created = await stub.CreateWorkspace(
            toolexec_service_pb2.CreateWorkspaceRequest(name="nobody-home", driver="external")
        )
        ws = created.workspace.id
        assert created.workspace.driver == "external" and created.agent_token

        loop = asyncio.get_running_loop()
        for name, args in (
            ("execute", {"command": "echo should-not-run"}),
            ("write_file", {"path": "a.txt", "content": "x"}),
            ("read_file", {"path": "a.txt"}),
        ):
            started = loop.time()
            response = await asyncio.wait_for(stub.CallTool(call_request(ws, name, args, f"off-{name}")), 20)
            waited = loop.time() - started
            assert response.is_error, (name, response.content)
            assert "offline" in response.content, response.content
            assert json.loads(response.structured_json).get("error") == "workspace_offline"
            assert not response.replayed
            # Bounded: the configured wait, plus the router's polling, not a hang.
            assert waited < 5.0, f"{name} waited {waited:.2f} s"

        got = await stub.GetWorkspace(toolexec_service_pb2.GetWorkspaceRequest(workspace_id=ws))
        assert not got.workspace.agent.connected

    # Nothing ran, so nothing is recorded: a retry with the same id asks the agent again.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM toolexec_tool_calls WHERE workspace_id = %s", (ws,))
        row = await cur.fetchone()
    assert row is not None and row[0] == 0


async def test_local_workspace_token_is_not_rotated_and_its_agent_keeps_serving(toolexec: Toolexec) -> None:
    """The local driver manages its agents' tokens: rotation is refused, nothing is stopped."""
    ws = await toolexec.create()
    stub = toolexec.stub()
    first = await stub.CallTool(call_request(ws, "execute", {"command": "echo before"}))
    assert not first.is_error, first.content
    old_pid = toolexec.server.driver.agent_pid(ws)
    assert old_pid is not None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RotateWorkspaceAgentToken(
            toolexec_service_pb2.RotateWorkspaceAgentTokenRequest(workspace_id=ws)
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "external" in (info.value.details() or "")
    after = await stub.CallTool(call_request(ws, "execute", {"command": "echo after"}))
    assert json.loads(after.structured_json)["output"] == "after\n"
    assert toolexec.server.driver.agent_pid(ws) == old_pid


async def test_a_local_agent_that_died_is_started_again_by_the_next_call(toolexec: Toolexec) -> None:
    """A host reboot or a killed sandbox: the next call starts a new agent (new token) and runs."""
    ws = await toolexec.create()
    stub = toolexec.stub()
    await stub.CallTool(call_request(ws, "write_file", {"path": "kept.txt", "content": "kept"}))
    old_pid = toolexec.server.driver.agent_pid(ws)
    assert toolexec.server.driver.kill_agent(ws) > 0
    await wait_until(lambda: toolexec.server.hub.get(ws) is None, what="the dead agent's connection to end")
    loop = asyncio.get_running_loop()
    started = loop.time()
    after = await stub.CallTool(call_request(ws, "execute", {"command": "cat kept.txt"}))
    waited = loop.time() - started
    assert not after.is_error, f"after {waited:.1f} s: {after.content}"
    assert json.loads(after.structured_json)["output"] == "kept"
    assert waited < 5.0, f"the call waited {waited:.1f} s for the new agent"
    assert toolexec.server.driver.agent_pid(ws) not in (None, old_pid)
