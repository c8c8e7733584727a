"""`agentplane workspace create|list|delete --output json` against a running toolexec."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tests.toolexec.conftest import Toolexec, ws_exists

REPO_ROOT = Path(__file__).resolve().parents[2]


async def _cli(tx: Toolexec, *argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        "workspace",
        *argv,
        "--address",
        tx.server.address,
        "--token",
        tx.make_token("carol"),
        "--output",
        "json",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode() or err.decode()


async def test_workspace_cli(toolexec: Toolexec) -> None:
    code, out = await _cli(toolexec, "create", "from-cli")
    assert code == 0, out
    created = json.loads(out)
    assert created["owner_id"] == "carol" and created["state"] == "WORKSPACE_STATE_READY"
    code, out = await _cli(toolexec, "list")
    assert code == 0 and [w["id"] for w in json.loads(out)] == [created["id"]]
    code, out = await _cli(toolexec, "delete", created["id"])
    assert code == 0 and json.loads(out) == {"deleted": created["id"]}
    assert not ws_exists(toolexec, created["id"])
    # Deletes are idempotent (docs/api.md): deleting what is gone succeeds, so a retry is safe.
    code, out = await _cli(toolexec, "delete", created["id"])
    assert code == 0 and json.loads(out) == {"deleted": created["id"]}


async def test_external_workspace_cli_prints_the_agent_command_and_rotates(toolexec: Toolexec) -> None:
    code, out = await _cli(toolexec, "create", "ext", "--driver", "external")
    assert code == 0, out
    created = json.loads(out)
    token = created["agent_token"]
    assert created["workspace"]["driver"] == "external" and token.startswith("apw_")
    assert f"AGENTPLANE_AGENT_TOKEN={token}" in created["agent_command"]
    assert f"--workspace {created['workspace']['id']}" in created["agent_command"]
    code, out = await _cli(toolexec, "rotate-token", created["workspace"]["id"])
    assert code == 0, out
    rotated = json.loads(out)
    assert rotated["agent_token"] != token and rotated["agent_token"] in rotated["agent_command"]
