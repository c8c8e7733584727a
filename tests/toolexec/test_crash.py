"""A toolexec killed (SIGKILL) during an execute and restarted: the command, which runs in the
workspace agent, goes on; the agent reconnects to the new toolexec; the retried call gets the
command's real result (it ran once); a background process started before the kill is still
readable with process_output; the ledger has nothing left 'started'.

Runs the real `agentplane serve toolexec` as a subprocess, twice, on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.client import create_channel
from services.common.embedded import free_port
from tests.helpers import wait_until
from tests.toolexec.conftest import call_request

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(90)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


@pytest.fixture
def spawn(
    database_url: str, keys_dir: str, workspaces_dir: str
) -> Iterator[Callable[[int], subprocess.Popen[bytes]]]:
    """Start `agentplane serve toolexec` on a port; every started server is killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "DATABASE_URL": database_url,
        "AGENTPLANE_KEYS_DIR": keys_dir,
        "AGENTPLANE_HOST": "127.0.0.1",
        "AGENTPLANE_TOOLEXEC_METRICS_PORT": "0",
        "AGENTPLANE_WORKSPACES_DIR": workspaces_dir,
        "AGENTPLANE_LOG_LEVEL": "WARNING",
        "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}",
    }

    def start(port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "serve", "toolexec"],
            cwd=REPO_ROOT,
            env={**env, "AGENTPLANE_TOOLEXEC_PORT": str(port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


async def _wait_serving(address: str, proc: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def status() -> str:
            assert proc.poll() is None, "toolexec exited during startup"
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

        await wait_until(status, until=lambda s: s == "SERVING", timeout=30, what="toolexec to be SERVING")


async def test_killed_during_execute_and_restarted(
    spawn: Callable[[int], subprocess.Popen[bytes]],
    make_token: Callable[..., str],
    workspaces_dir: str,
    database_url: str,
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    first = spawn(port)
    await _wait_serving(address, first)
    channel = create_channel(address, token=make_token("alice"))
    try:
        stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
        ws = (
            await stub.CreateWorkspace(toolexec_service_pb2.CreateWorkspaceRequest(name="crash"))
        ).workspace.id
        root = os.path.join(workspaces_dir, ws)
        log_path = os.path.join(root, "log")
        background = await stub.CallTool(
            call_request(
                ws,
                "execute",
                {
                    "command": "echo tick1; echo tick2; while [ ! -e go2 ]; do sleep 0.05; done; echo done",
                    "run_in_background": True,
                },
            )
        )
        process_id = json.loads(background.structured_json)["process_id"]
        # A gate the test opens: no sleep stands in for "the command is still running".
        command = "echo start >> log; while [ ! -e go ]; do sleep 0.05; done; echo end >> log"
        request = call_request(ws, "execute", {"command": command, "timeout_seconds": 60}, "crash-1")
        in_flight = asyncio.ensure_future(stub.CallTool(request))
        await wait_until(
            lambda: _read(log_path),
            until=lambda text: text == "start\n",
            timeout=15,
            what="the command to start",
        )

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await in_flight
        agent_pid = json.loads(Path(workspaces_dir, ".agents", ws, "agent.json").read_text())["pid"]  # noqa: ASYNC240
        assert _alive(agent_pid), "the workspace agent must outlive toolexec"

        second = spawn(port)
        await _wait_serving(address, second)
        Path(root, "go").touch()  # noqa: ASYNC240
        # wait_for_ready: the channel may still be in reconnect backoff after the server vanished.
        retry = await stub.CallTool(request, wait_for_ready=True, timeout=30)
        assert not retry.is_error, retry.content
        assert json.loads(retry.structured_json)["exit_code"] == 0
        assert _read(log_path) == "start\nend\n"  # ran once, to its end, across the restart

        # The background process outlived toolexec: its output is still there.
        Path(root, "go2").touch()  # noqa: ASYNC240
        for _ in range(20):
            out = await stub.CallTool(
                call_request(ws, "process_output", {"process_id": process_id, "wait_seconds": 10})
            )
            assert not out.is_error, out.content
            if not json.loads(out.structured_json)["running"]:
                break
        assert json.loads(out.structured_json)["output"] == "tick1\ntick2\ndone\n", out.structured_json

        # The workspace is usable.
        ok = await stub.CallTool(call_request(ws, "execute", {"command": "cat log; echo alive"}))
        assert json.loads(ok.structured_json)["output"] == "start\nend\nalive\n"

        # The ledger is consistent: nothing is left 'started'.
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute(
                "SELECT tool_call_id, state FROM toolexec_tool_calls WHERE workspace_id = %s", (ws,)
            )
            rows: dict[str, str] = dict(await cur.fetchall())
        assert rows["crash-1"] == "completed"
        assert all(state == "completed" for state in rows.values())

        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
    finally:
        await channel.close()
