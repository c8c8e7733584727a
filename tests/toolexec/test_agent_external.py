"""The external driver: CreateWorkspace returns the agent token and command; a real agent process
started by hand (`python -m services.agent`) against toolexec's TCP address serves the calls;
rotating the token stops the running agent and refuses the old token; deleting the workspace
stops the agent and invalidates the token; Postgres keeps only the token's hash; a valid token
with a hello for another workspace is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import psycopg
import pytest
from agentplane.toolexec.v1 import toolexec_service_pb2
from agentplane.toolexec.v1 import workspace_agent_service_pb2 as agent_pb
from agentplane.toolexec.v1 import workspace_agent_service_pb2_grpc as agent_grpc

from services.agent.connection import EXIT_UNAUTHENTICATED, VERSION
from tests.helpers import wait_until
from tests.toolexec.conftest import Toolexec, call_request

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


@dataclass
class Agent:
    """A workspace agent process started by the test."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def exited(self, seconds: float = 20.0) -> int:
        """Wait for the agent to exit by itself; its exit code."""
        try:
            code = await wait_until(
                self.proc.poll, until=lambda code: code is not None, timeout=seconds, what="the agent to exit"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{self.log()}") from None
        assert code is not None
        return code


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """`start_agent(url, workspace, token, root, state)`: a real agent process; all killed at teardown."""
    started: list[Agent] = []

    def start(url: str, workspace_id: str, token: str, root: Path, state: Path) -> Agent:
        log_path = tmp_path / f"agent-{len(started)}.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}",
            "AGENTPLANE_AGENT_TOKEN": token,
        }
        argv = [sys.executable, "-m", "services.agent", "--url", url, "--workspace", workspace_id]
        argv += ["--root", str(root), "--state-dir", str(state)]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        agent = Agent(proc, log_path)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.proc.pid, 9)
        agent.proc.wait(timeout=10)


async def _create_external(tx: Toolexec, name: str = "ext") -> toolexec_service_pb2.CreateWorkspaceResponse:
    return await tx.stub().CreateWorkspace(
        toolexec_service_pb2.CreateWorkspaceRequest(name=name, driver="external")
    )


async def _connected(tx: Toolexec, ws: str, agent: Agent, seconds: float = 20.0) -> None:
    def link() -> object:
        assert agent.proc.poll() is None, f"the agent exited ({agent.proc.returncode}):\n{agent.log()}"
        return tx.server.hub.get(ws)

    try:
        await wait_until(
            link, until=lambda link: link is not None, timeout=seconds, what="the agent to connect"
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its log:\n{agent.log()}") from None


async def _stored_hash(database_url: str, ws: str) -> str | None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT agent_token_sha256 FROM toolexec_workspaces WHERE id = %s", (ws,))
        row = await cur.fetchone()
    assert row is not None
    return row[0]


def _dirs(tmp_path: Path, name: str) -> tuple[Path, Path]:
    root, state = tmp_path / f"{name}-root", tmp_path / f"{name}-state"
    root.mkdir()
    return root, state


async def test_external_agent_lifecycle(
    toolexec: Toolexec, start_agent: Callable[..., Agent], tmp_path: Path, database_url: str
) -> None:
    url = toolexec.server.address
    created = await _create_external(toolexec)
    ws = created.workspace.id
    token = created.agent_token
    assert created.workspace.driver == "external"
    assert token.startswith("apw_") and len(token) > 40
    # The exact command to run the agent anywhere: toolexec's address, the workspace, the token.
    command = shlex.split(created.agent_command)
    assert f"AGENTPLANE_AGENT_TOKEN={token}" in command and "workspace-agent" in command
    assert command[command.index("--url") + 1] == url
    assert command[command.index("--workspace") + 1] == ws
    assert "--token" not in command, "the token must not be on the agent's command line"

    # Postgres keeps only the hash.
    stored = await _stored_hash(database_url, ws)
    assert stored == hashlib.sha256(token.encode()).hexdigest() and stored != token
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT row_to_json(w)::text FROM toolexec_workspaces w WHERE id = %s", (ws,)
        )
        row = await cur.fetchone()
    assert row is not None and token not in row[0]

    # Not connected yet.
    got = await toolexec.stub().GetWorkspace(toolexec_service_pb2.GetWorkspaceRequest(workspace_id=ws))
    assert not got.workspace.agent.connected

    root, state = _dirs(tmp_path, "ext")
    agent = start_agent(url, ws, token, root, state)
    await _connected(toolexec, ws, agent)
    stub = toolexec.stub()
    wrote = await stub.CallTool(
        call_request(ws, "write_file", {"path": "notes/a.txt", "content": "external\n"})
    )
    assert not wrote.is_error, wrote.content
    assert (root / "notes" / "a.txt").read_text() == "external\n"
    ran = await stub.CallTool(call_request(ws, "execute", {"command": "cat notes/a.txt; pwd"}))
    info = json.loads(ran.structured_json)
    assert not ran.is_error and info["exit_code"] == 0, ran.content
    assert info["output"] == f"external\n{root}\n", info
    # The agent's environment (with the token) is not passed to the commands it runs.
    env = await stub.CallTool(call_request(ws, "execute", {"command": "env"}))
    assert token not in env.content and "AGENTPLANE_AGENT_TOKEN" not in env.content

    got = await stub.GetWorkspace(toolexec_service_pb2.GetWorkspaceRequest(workspace_id=ws))
    assert got.workspace.agent.connected and got.workspace.agent.version == VERSION
    assert "execute" in got.workspace.agent.capabilities
    assert got.workspace.driver == "external"

    # Rotation: the running agent is told its token was revoked and exits (3).
    rotated = await stub.RotateWorkspaceAgentToken(
        toolexec_service_pb2.RotateWorkspaceAgentTokenRequest(workspace_id=ws)
    )
    new_token = rotated.agent_token
    assert new_token and new_token != token and new_token in rotated.agent_command
    assert await agent.exited() == EXIT_UNAUTHENTICATED
    assert await _stored_hash(database_url, ws) == hashlib.sha256(new_token.encode()).hexdigest()

    # The old token is refused at once: the agent exits 3 quickly, never connecting.
    loop = asyncio.get_running_loop()
    started = loop.time()
    stale = start_agent(url, ws, token, root, state)
    assert await stale.exited(15) == EXIT_UNAUTHENTICATED
    assert loop.time() - started < 15
    assert toolexec.server.hub.get(ws) is None

    # The new token serves calls (the same directory and state: an agent restart).
    fresh = start_agent(url, ws, new_token, root, state)
    await _connected(toolexec, ws, fresh)
    again = await stub.CallTool(call_request(ws, "execute", {"command": "cat notes/a.txt"}))
    assert json.loads(again.structured_json)["output"] == "external\n", again.content

    # Deleting the workspace stops the agent and invalidates the token.
    await stub.DeleteWorkspace(toolexec_service_pb2.DeleteWorkspaceRequest(workspace_id=ws))
    code = await fresh.exited()
    assert code == 0, fresh.log()
    after = start_agent(url, ws, new_token, root, state)
    assert await after.exited(15) == EXIT_UNAUTHENTICATED


async def test_connect_needs_a_valid_token(toolexec: Toolexec) -> None:
    created = await _create_external(toolexec)
    ws = created.workspace.id
    async with grpc.aio.insecure_channel(toolexec.server.address) as channel:
        stub = agent_grpc.WorkspaceAgentServiceStub(channel)
        for metadata in (
            (),
            (("authorization", "Bearer apw_not-a-real-token"),),
            (("authorization", f"Bearer {created.agent_token}x"),),
        ):
            call = stub.Connect(metadata=metadata)
            await call.write(agent_pb.ConnectRequest(hello=agent_pb.AgentHello(workspace_id=ws)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    assert toolexec.server.hub.get(ws) is None


async def test_valid_token_with_hello_for_another_workspace_is_refused(
    toolexec: Toolexec, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    first = await _create_external(toolexec, "first")
    second = await _create_external(toolexec, "second")
    ws1, ws2 = first.workspace.id, second.workspace.id

    # At the protocol level: PERMISSION_DENIED, and no link for either workspace.
    async with grpc.aio.insecure_channel(toolexec.server.address) as channel:
        stub = agent_grpc.WorkspaceAgentServiceStub(channel)
        call = stub.Connect(metadata=(("authorization", f"Bearer {first.agent_token}"),))
        await call.write(agent_pb.ConnectRequest(hello=agent_pb.AgentHello(workspace_id=ws2, version="evil")))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ws1 in (err.value.details() or "")
    assert toolexec.server.hub.get(ws1) is None and toolexec.server.hub.get(ws2) is None

    # A real agent doing the same exits 3 (refused), and the other workspace stays offline.
    root, state = _dirs(tmp_path, "mismatch")
    agent = start_agent(toolexec.server.address, ws2, first.agent_token, root, state)
    assert await agent.exited(15) == EXIT_UNAUTHENTICATED
    assert toolexec.server.hub.get(ws2) is None
    got = await toolexec.stub().GetWorkspace(toolexec_service_pb2.GetWorkspaceRequest(workspace_id=ws2))
    assert not got.workspace.agent.connected and not got.workspace.agent.version


async def test_local_workspace_token_is_stored_hashed_and_not_returned(
    toolexec: Toolexec, database_url: str
) -> None:
    created = await toolexec.stub().CreateWorkspace(toolexec_service_pb2.CreateWorkspaceRequest(name="loc"))
    # The local driver hands its agent the token itself; the API does not show it.
    assert created.workspace.driver == "local" and not created.agent_token and not created.agent_command
    stored = await _stored_hash(database_url, created.workspace.id)
    assert stored is not None and len(stored) == 64 and not stored.startswith("apw_")


async def _next_message(call: grpc.aio.StreamStreamCall, seconds: float) -> agent_pb.ConnectResponse | None:
    """The next non-heartbeat message toolexec sends, or None when it ended the stream."""
    async with asyncio.timeout(seconds):
        while True:
            try:
                message = await call.read()
            except grpc.aio.AioRpcError:
                return None
            if message is grpc.aio.EOF:
                return None
            if message.WhichOneof("message") != "heartbeat":
                return message


async def test_rotation_ends_the_old_connection_even_if_the_agent_ignores_the_signal(
    toolexec: Toolexec,
) -> None:
    """A leaked token's connection must not outlive a rotation: toolexec closes it itself."""
    created = await _create_external(toolexec, "leaked")
    ws = created.workspace.id
    async with grpc.aio.insecure_channel(toolexec.server.address) as channel:
        stub = agent_grpc.WorkspaceAgentServiceStub(channel)
        # An agent (an attacker's, with a stolen token) that does not obey signals.
        call = stub.Connect(metadata=(("authorization", f"Bearer {created.agent_token}"),))
        await call.write(agent_pb.ConnectRequest(hello=agent_pb.AgentHello(workspace_id=ws, version="rogue")))
        welcome = await _next_message(call, 10)
        assert welcome is not None and welcome.HasField("welcome")
        assert toolexec.server.hub.get(ws) is not None

        await toolexec.stub().RotateWorkspaceAgentToken(
            toolexec_service_pb2.RotateWorkspaceAgentTokenRequest(workspace_id=ws)
        )
        signal = await _next_message(call, 10)
        assert signal is not None and signal.signal.kind == agent_pb.AGENT_SIGNAL_KIND_TOKEN_REVOKED
        # A user's call made now must not reach the rogue connection.
        pending = asyncio.ensure_future(
            toolexec.stub().CallTool(call_request(ws, "write_file", {"path": "x", "content": "secret"}))
        )
        try:
            after = await _next_message(call, 5)
            assert after is None, f"toolexec kept the revoked connection open and sent it: {after}"
            assert toolexec.server.hub.get(ws) is None
        finally:
            call.cancel()
            pending.cancel()
