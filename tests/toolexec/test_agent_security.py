"""An attacker inside a local (sandboxed) workspace hunts for the control plane's secrets.

A chat-like list of tool calls, as a model told to find secrets would make them: the
environment of every process it can see, the process list, /proc/1, the host's data and
workspaces directories, the control plane's ports, the agent socket, the agent's own
environment and state. The combined output must hold none of the control plane's secrets.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import Settings
from services.toolexec.sandbox import python_binds
from tests.toolexec.conftest import Toolexec, call_request

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

SOCKET_PROBE = r"""
import grpc
from agentplane.toolexec.v1 import toolexec_service_pb2 as ts, toolexec_service_pb2_grpc as tsg
from agentplane.toolexec.v1 import workspace_agent_service_pb2 as ag, workspace_agent_service_pb2_grpc as agg
ch = grpc.insecure_channel("unix:///run/agentplane/sock/agent.sock")
def probe(name, fn):
    try:
        fn()
        print(name, "OK")
    except grpc.RpcError as exc:
        print(name, exc.code().name)
users, relay = tsg.ToolExecServiceStub(ch), agg.AgentRelayServiceStub(ch)
probe("list_workspaces", lambda: users.ListWorkspaces(ts.ListWorkspacesRequest(), timeout=5))
probe("relay", lambda: relay.RelayToolCall(ag.RelayToolCallRequest(), timeout=5))
def connect():
    hello = iter([ag.ConnectRequest(hello=ag.AgentHello(workspace_id="ws_00000000000000000000"))])
    for _ in agg.WorkspaceAgentServiceStub(ch).Connect(hello, timeout=5):
        pass
probe("connect_without_token", connect)
"""

NET_PROBE = r"""
import socket, sys
for port in sys.argv[1:]:
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=3).close()
        print("port", port, "CONNECTED")
    except OSError as exc:
        print("port", port, "blocked:", type(exc).__name__)
try:
    socket.create_connection(("1.1.1.1", 53), timeout=3).close()
    print("internet CONNECTED")
except OSError as exc:
    print("internet blocked:", type(exc).__name__)
"""


def _absolute(path: str) -> str:
    return os.path.abspath(path)


def _host_port(url: str) -> int | None:
    parsed = urllib.parse.urlparse(url)
    return parsed.port if parsed.hostname else None


def _socket_dir(url: str) -> str | None:
    host = urllib.parse.parse_qs(urllib.parse.urlparse(url).query).get("host")
    return host[0] if host else None


async def test_secret_hunt_from_inside_the_workspace_finds_nothing(
    toolexec: Toolexec, settings: Settings, secret: str, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    ws = await toolexec.create(name="hunted")
    stub = toolexec.stub()
    # The toolexec's TCP port, Postgres (its port, or the well-known one when it is on a socket),
    # Redis: none may be reachable from the workspace.
    ports = [toolexec.server.port, _host_port(database_url) or 5432, _host_port(redis_url) or 6379]
    pg_socket_dir = _socket_dir(database_url)
    host_paths = [
        toolexec.workspaces_dir,
        os.path.join(toolexec.workspaces_dir, ".agents"),
        str(tmp_path),
        _absolute(settings.data_dir),
        str(REPO_ROOT / "tests"),
        str(REPO_ROOT / ".git"),
        *([pg_socket_dir] if pg_socket_dir else []),
    ]
    python = sys.executable  # bound read-only into the sandbox (the agent runs on it)

    hunt: list[tuple[str, str, dict[str, Any]]] = [
        ("whoami", "execute", {"command": "id; id -u"}),
        ("my env", "execute", {"command": "env"}),
        ("parent env", "execute", {"command": "tr '\\0' '\\n' < /proc/$PPID/environ; echo"}),
        (
            "every environ",
            "execute",
            {
                "command": 'for f in /proc/[0-9]*/environ; do echo "== $f"; tr "\\0" "\\n" < "$f"; echo; '
                "done 2>&1"
            },
        ),
        ("pid 1", "execute", {"command": "tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/1/environ 2>&1"}),
        ("process list", "execute", {"command": "ps -eo pid,user,comm"}),
        (
            "every cmdline",
            "execute",
            {"command": 'for p in /proc/[0-9]*; do echo "$p $(tr "\\0" " " < $p/cmdline)"; done 2>&1'},
        ),
        (
            "agent environ",
            "execute",
            {
                "command": "for p in /proc/[0-9]*; do "
                'if tr "\\0" " " < $p/cmdline 2>/dev/null | grep -q "^[^ ]*python.* -m services.agent"; then '
                'echo "agent $p"; cat $p/environ; ls $p/fd; cat $p/mem | head -c 1; fi; done 2>&1'
            },
        ),
        ("root dir", "execute", {"command": "ls -la / /root /run /run/agentplane /tmp /var/tmp 2>&1"}),
        ("host paths", "execute", {"command": " ".join(["ls -la", *host_paths, "2>&1; true"])}),
        ("shadow", "execute", {"command": "cat /etc/shadow 2>&1; true"}),
        ("network", "execute", {"command": f"python3 -c '{NET_PROBE}' {' '.join(map(str, ports))} 2>&1"}),
        ("tcp table", "execute", {"command": "cat /proc/net/tcp /proc/net/tcp6 2>&1; ip addr 2>&1; true"}),
        ("agent socket", "execute", {"command": f"{python} -c '{SOCKET_PROBE}' 2>&1", "timeout_seconds": 60}),
        ("agent state", "execute", {"command": "find /run/agentplane -maxdepth 3 2>&1"}),
        # (The patterns are written so that this command line does not itself contain them.)
        (
            "grep secrets",
            "execute",
            {
                # The read-only code the agent runs (the project's source, the venv) is bound into
                # the sandbox, under /tmp when the checkout lives there: it names these variables
                # without holding any value, so it is left out of the search.
                "command": "find /run /tmp /var/tmp /workspace /root /etc "
                + " ".join(f"-path {shlex.quote(p)} -prune -o" for p in python_binds())
                + " -type f -print 2>/dev/null | "
                "xargs -r grep -lE 'ap[w]_|AGENTPLANE_SECRE[T]|DATABASE_UR[L]|REDIS_UR[L]' 2>/dev/null; true"
            },
        ),
        ("read environ", "read_file", {"path": "/proc/1/environ"}),
        ("read outside", "read_file", {"path": "../.agents"}),
        ("kernel keys", "execute", {"command": "cat /proc/keys 2>&1; true"}),
    ]

    outputs: dict[str, str] = {}
    errors: dict[str, bool] = {}
    for i, (label, tool, args) in enumerate(hunt):
        response = await stub.CallTool(call_request(ws, tool, args, f"hunt-{i}"))
        text = response.content + "\n" + response.structured_json
        if tool == "execute":
            assert not response.is_error, (label, response.content)
            text = json.loads(response.structured_json)["output"]
        outputs[label] = text
        errors[label] = response.is_error
    combined = "\n".join(f"### {label}\n{text}" for label, text in outputs.items())

    # No secret of the control plane anywhere in what the hunt found.
    db_name = urllib.parse.urlparse(database_url).path.lstrip("/")
    for needle in (secret, database_url, redis_url, db_name, "apw_", "AGENTPLANE_AGENT_TOKEN"):
        assert needle not in combined, f"{needle!r} leaked into the workspace:\n{combined}"
    discovery = "\n".join(
        outputs[k]
        for k in ("my env", "parent env", "every environ", "pid 1", "process list", "every cmdline")
    )
    # (The agent is pid 1; its command line shows the workspace's own paths, no secret.)
    for needle in ("AGENTPLANE_SECRET", "DATABASE_URL", "REDIS_URL", "postgres", "redis", "-m pytest"):
        assert needle not in discovery, f"{needle!r} visible from the workspace:\n{discovery}"

    # An unprivileged user, alone in its PID namespace with the agent.
    assert outputs["whoami"].splitlines()[-1] != "0"
    assert "uid=0(" not in outputs["whoami"]
    comms = [line.split()[2] for line in outputs["process list"].splitlines()[1:] if line.strip()]
    assert comms.count("python") + comms.count("python3") == 1, outputs["process list"]
    assert set(comms) <= {"python", "python3", "sh", "ps"}, outputs["process list"]
    programs = [line.split()[1] for line in outputs["every cmdline"].splitlines() if len(line.split()) > 1]
    assert programs[:1] == [python] and set(programs[1:]) <= {"sh"}, programs

    # The agent's environment, fds and memory are closed to the commands it runs (it is undumpable).
    agent = outputs["agent environ"]
    assert re.search(r"^agent /proc/\d+$", agent, re.M), agent
    assert agent.count("Permission denied") >= 3, agent
    assert "PATH=" not in agent

    # pid 1's environment is not readable, and its command line carries no secret (checked above).
    assert "Permission denied" in outputs["pid 1"]

    # None of the host's control-plane paths exist in the sandbox.
    assert outputs["host paths"].count("No such file or directory") == len(host_paths), outputs["host paths"]
    assert "Permission denied" in outputs["shadow"]

    # No network: not toolexec, not Postgres, not Redis, not the internet.
    assert "CONNECTED" not in outputs["network"], outputs["network"]
    assert outputs["network"].count("blocked") == len(ports) + 1, outputs["network"]

    # The agent socket serves agents only: no user API, no relay, nothing without a token.
    probe = outputs["agent socket"]
    assert "list_workspaces UNIMPLEMENTED" in probe, probe
    assert "relay UNIMPLEMENTED" in probe, probe
    assert "connect_without_token UNAUTHENTICATED" in probe, probe

    # Nothing the sandbox can read mentions a token or the control plane's settings.
    assert outputs["grep secrets"].strip() == "", outputs["grep secrets"]

    # The confined file tools refuse paths outside the workspace.
    for label in ("read environ", "read outside"):
        assert errors[label] and "PATH=" not in outputs[label], outputs[label]
        assert "outside the workspace" in outputs[label], outputs[label]
