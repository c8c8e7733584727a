"""Each workspace runs as its own uid (as root), so per-user limits stay per workspace.

RLIMIT_NPROC counts every process of a uid on the host, whatever namespace it lives in: with one
uid shared by all workspaces, one workspace that starts a few hundred processes left every other
workspace unable to fork ("sh: 0: Cannot fork").
"""

from __future__ import annotations

import json
import os

import psutil
import pytest
from agentplane.toolexec.v1 import toolexec_service_pb2

from tests.helpers import kill_agents
from tests.toolexec.conftest import Toolexec, call_request, ws_path, ws_write


async def _execute(tx: Toolexec, ws: str, command: str, seconds: float = 30) -> dict[str, object]:
    r = await tx.stub().CallTool(
        call_request(ws, "execute", {"command": command, "timeout_seconds": seconds})
    )
    assert not r.is_error, r.content
    info: dict[str, object] = json.loads(r.structured_json)
    return info


@pytest.fixture(autouse=True)
def _needs_root(toolexec: Toolexec) -> None:
    if not toolexec.server.driver.sandbox.drops_privileges():
        pytest.fail("these tests run as root (as CI does): toolexec must drop privileges to test uids")


async def test_each_workspace_has_its_own_uid(toolexec: Toolexec) -> None:
    a, b = await toolexec.create(name="a"), await toolexec.create(name="b")
    uid_a = (await _execute(toolexec, a, "id -u"))["output"]
    uid_b = (await _execute(toolexec, b, "id -u"))["output"]
    assert isinstance(uid_a, str) and isinstance(uid_b, str)
    assert uid_a.strip() != uid_b.strip()
    assert "0" not in (uid_a.strip(), uid_b.strip())
    assert os.stat(ws_path(toolexec, a)).st_uid == int(uid_a)


@pytest.mark.timeout(120)
async def test_one_workspace_at_its_process_limit_leaves_others_able_to_fork(toolexec: Toolexec) -> None:
    greedy, other = await toolexec.create(name="greedy"), await toolexec.create(name="other")
    # Start background processes until the workspace's process limit (512) refuses more.
    filled = await _execute(
        toolexec,
        greedy,
        "i=0; while [ $i -lt 600 ]; do sleep 300 >/dev/null 2>&1 </dev/null & i=$((i+1)); done 2>/dev/null;"
        " echo started",
        seconds=60,
    )
    greedy_uid, _ = toolexec.server.driver.sandbox.ids_for(greedy)
    running = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"].real == greedy_uid)
    assert running >= 400, (filled, running)  # at its limit: it cannot fork any more itself
    # The other workspace still runs commands.
    done = await _execute(toolexec, other, "/bin/echo still-forking")  # a new process, not a builtin
    assert done["exit_code"] == 0 and done["output"] == "still-forking\n"
    # Deleting the workspace takes its processes with it.
    await toolexec.stub().DeleteWorkspace(toolexec_service_pb2.DeleteWorkspaceRequest(workspace_id=greedy))


async def test_a_workspace_from_before_per_workspace_uids_is_adopted(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    ws_write(toolexec, ws, "notes/old.txt", "written when every workspace ran as 65534\n")
    # What an earlier version left: everything owned by the shared workspace user.
    for dirpath, dirnames, filenames in os.walk(ws_path(toolexec, ws)):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), 65534, 65534)
    os.lchown(ws_path(toolexec, ws), 65534, 65534)
    kill_agents(toolexec.workspaces_dir)  # the next call starts the agent again, as after an upgrade
    r = await toolexec.stub().CallTool(
        call_request(
            ws,
            "edit_files",
            {"edits": [{"path": "notes/old.txt", "old_text": "65534", "new_text": "its own uid"}]},
        )
    )
    assert not r.is_error, r.content
    uid, _ = toolexec.server.driver.sandbox.ids_for(ws)
    assert os.stat(ws_path(toolexec, ws, "notes/old.txt")).st_uid == uid
    assert os.stat(ws_path(toolexec, ws)).st_uid == uid
