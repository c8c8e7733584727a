"""A workspace's network: none by default; with a template's network access, its own NAT
(slirp4netns) that cannot reach anything on the host's loopback (Postgres, Redis, toolexec)."""

from __future__ import annotations

import json
import shlex
import socket
from pathlib import Path

import pytest
from agentplane.toolexec.v1 import toolexec_pb2
from agentplane.toolexec.v1 import toolexec_service_pb2 as Req

from services.toolexec import netns
from services.toolexec.templates import DirectoryFill, GitFill, Template
from tests.toolexec.conftest import Toolexec, call_request

pytestmark = pytest.mark.skipif(not netns.available(), reason="slirp4netns is not installed")

PROBE = """
import socket, sys
for host, port in [(h, int(p)) for h, p in (a.split(':') for a in sys.argv[1:])]:
    try:
        socket.create_connection((host, port), 2).close()
        print(host, port, 'OPEN')
    except OSError as exc:
        print(host, port, 'closed', type(exc).__name__)
"""


def _listening_port() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


async def _probe(toolexec: Toolexec, ws: str, targets: list[str]) -> str:
    command = (
        f"python3 -c {shlex.quote(PROBE)} {' '.join(targets)}; ip -o addr show | cut -d' ' -f2 | sort -u"
    )
    r = await toolexec.stub().CallTool(
        call_request(ws, "execute", {"command": command, "timeout_seconds": 30})
    )
    assert not r.is_error, r.content
    return str(json.loads(r.structured_json)["output"])


async def test_no_network_by_default(toolexec: Toolexec) -> None:
    host = _listening_port()
    try:
        ws = await toolexec.create()
        port = host.getsockname()[1]
        out = await _probe(toolexec, ws, [f"127.0.0.1:{port}", f"{toolexec.server.address}"])
    finally:
        host.close()
    assert " OPEN" not in out and "tap0" not in out and "closed" in out, out


async def test_network_access_never_reaches_the_hosts_loopback(toolexec: Toolexec, tmp_path: Path) -> None:
    source = tmp_path / "tpl"
    source.mkdir()
    (source / "README.md").write_text("net\n")
    toolexec.templates.templates["net"] = Template(
        id="tpl-net", name="net", enabled=True, source=DirectoryFill(str(source)), network=True
    )
    host = _listening_port()
    try:
        resp = await toolexec.stub().CreateWorkspace(Req.CreateWorkspaceRequest(name="n", template_id="net"))
        assert resp.workspace.state == toolexec_pb2.WORKSPACE_STATE_READY, resp.workspace.failure_message
        port = host.getsockname()[1]
        out = await _probe(
            toolexec, resp.workspace.id, [f"127.0.0.1:{port}", toolexec.server.address, "10.0.2.2:5432"]
        )
    finally:
        host.close()
    # The sandbox has an interface to the outside (slirp's NAT)...
    assert "tap0" in out, out
    # ...and none of the host's loopback services answers: not a listener the test opened, not toolexec.
    assert " OPEN" not in out, out


async def test_a_remote_clone_runs_with_network_that_still_cannot_reach_the_host(
    toolexec: Toolexec,
) -> None:
    host = _listening_port()
    port = host.getsockname()[1]
    toolexec.templates.templates["remote"] = Template(
        id="tpl-remote", name="remote", enabled=True, source=GitFill(f"http://127.0.0.1:{port}/repo.git")
    )
    try:
        resp = await toolexec.stub().CreateWorkspace(
            Req.CreateWorkspaceRequest(name="r", template_id="remote")
        )
    finally:
        host.close()
    ws = resp.workspace
    assert ws.state == toolexec_pb2.WORKSPACE_STATE_FAILED
    # git got as far as connecting (so the network was up), and the host's loopback refused it.
    assert "git clone" in ws.failure_message and "127.0.0.1" in ws.failure_message, ws.failure_message
    assert "Could not resolve" not in ws.failure_message and "connect" in ws.failure_message, (
        ws.failure_message
    )
