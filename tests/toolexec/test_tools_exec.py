"""execute and the process tools through CallTool: output, exit codes, timeouts turning into
background processes, process_output, process_list, signals, truncation, parallelism, limits."""

from __future__ import annotations

import asyncio
import json
import os

from agentplane.toolexec.v1 import toolexec_service_pb2
from google.protobuf import duration_pb2

from services.agent import reaper
from tests.helpers import wait_until
from tests.toolexec.conftest import Toolexec, call_request, ws_exists, ws_path, ws_write


async def _call(tx: Toolexec, ws: str, name: str, args: dict | str) -> toolexec_service_pb2.CallToolResponse:
    return await tx.stub().CallTool(call_request(ws, name, args))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


async def test_execute_output_and_exit_code(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    r = await _call(toolexec, ws, "execute", {"command": "echo out; echo err >&2; exit 3"})
    assert not r.is_error
    info = json.loads(r.structured_json)
    assert info["exit_code"] == 3 and info["running"] is False and not info["truncated"]
    assert "out\n" in info["output"] and "err\n" in info["output"]
    assert r.content.startswith("exit code 3")


async def test_execute_workdir_and_environment(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    os.makedirs(ws_path(toolexec, ws, "sub/dir"))
    os.environ["AGENTPLANE_TEST_LEAK"] = "should-not-leak"
    try:
        r = await _call(
            toolexec,
            ws,
            "execute",
            {"command": "pwd; env; ulimit -n; ulimit -t", "workdir": "sub/dir"},
        )
    finally:
        del os.environ["AGENTPLANE_TEST_LEAK"]
    out = json.loads(r.structured_json)["output"]
    # In the sandbox the workspace is /workspace; the host path never shows.
    assert out.splitlines()[0].endswith("/sub/dir") and toolexec.workspaces_dir not in out
    for expected in ("PAGER=cat", "GIT_TERMINAL_PROMPT=0", "TERM=dumb", "NO_COLOR=1"):
        assert expected in out
    for secret in ("AGENTPLANE_", "DATABASE_URL", "should-not-leak"):
        assert secret not in out
    # The default rlimits (1024 open files, 3600 CPU seconds) are applied.
    assert out.splitlines()[-2:] == ["1024", "3600"]
    r = await _call(toolexec, ws, "execute", {"command": "pwd", "workdir": "../.."})
    assert r.is_error and "outside the workspace" in r.content


async def test_timeout_turns_into_background_process(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    r = await _call(
        toolexec,
        ws,
        "execute",
        {
            "command": "echo started; while [ ! -e go ]; do sleep 0.05; done; echo finished; touch done",
            "timeout_seconds": 0.3,
        },
    )
    info = json.loads(r.structured_json)
    assert info["timed_out"] and info["running"]
    assert "continues in the background" in r.content and "started" in info["output"]
    # Still running, seen from inside the workspace (pids are the sandbox's own).
    r = await _call(toolexec, ws, "execute", {"command": f"ps -o stat= -p {info['pid']}"})
    assert json.loads(r.structured_json)["exit_code"] == 0, r.content
    ws_write(toolexec, ws, "go", "")
    # process_output waits for new output or the exit; poll it (bounded) until the exit.
    for _ in range(10):
        args = {"process_id": info["process_id"], "wait_seconds": 10}
        r = await _call(toolexec, ws, "process_output", args)
        out = json.loads(r.structured_json)
        if not out["running"]:
            break
    assert out["running"] is False and out["exit_code"] == 0
    assert out["output"] == "started\nfinished\n"
    assert ws_exists(toolexec, ws, "done")


async def test_request_timeout_caps_execute(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    req = call_request(ws, "execute", {"command": "sleep 5", "timeout_seconds": 60})
    req.timeout.CopyFrom(duration_pb2.Duration(nanos=200_000_000))
    r = await toolexec.stub().CallTool(req)
    info = json.loads(r.structured_json)
    assert info["timed_out"] is True
    assert r.duration.ToTimedelta().total_seconds() < 3


async def test_background_process_output_list_and_signals(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    r = await _call(
        toolexec,
        ws,
        "execute",
        {"command": "sleep 60 & echo tick; wait", "run_in_background": True},
    )
    info = json.loads(r.structured_json)
    pid, pid_id = info["pid"], info["process_id"]
    assert info["running"] and info["background"]
    # wait_seconds returns as soon as there is new output.
    r = await _call(toolexec, ws, "process_output", {"process_id": pid_id, "wait_seconds": 10})
    assert "tick" in json.loads(r.structured_json)["output"]
    r = await _call(toolexec, ws, "process_list", {})
    listed = json.loads(r.structured_json)["processes"]
    assert [p["process_id"] for p in listed] == [pid_id] and listed[0]["running"]
    # The child `sleep` is in the same process group: TERMINATE reaches it too. Pids are the
    # sandbox's own, so they are looked at from inside the workspace.
    r = await _call(toolexec, ws, "execute", {"command": f"ps -o pid= --ppid {pid}"})
    children = [int(x) for x in json.loads(r.structured_json)["output"].split()]
    assert children, "the background sleep should be a child of the shell"
    r = await _call(toolexec, ws, "process_signal", {"process_id": pid_id, "signal": "TERMINATE"})
    assert not r.is_error and json.loads(r.structured_json)["delivered"]
    check = " ".join(str(p) for p in [pid, *children])
    r = await _call(
        toolexec,
        ws,
        "execute",
        {"command": f"for p in {check}; do ps -o stat= -p $p | grep -qv Z && echo $p; done; true"},
    )
    assert json.loads(r.structured_json)["output"] == ""
    r = await _call(toolexec, ws, "process_output", {"process_id": pid_id})
    out = json.loads(r.structured_json)
    assert out["running"] is False and out["exit_code"] == -15


async def test_kill_signal(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    r = await _call(toolexec, ws, "execute", {"command": "trap '' TERM; sleep 60", "run_in_background": True})
    pid_id = json.loads(r.structured_json)["process_id"]
    r = await _call(toolexec, ws, "process_signal", {"process_id": pid_id, "signal": "KILL"})
    assert json.loads(r.structured_json)["running"] is False
    assert "exited with code -9" in r.content


async def test_process_tool_errors(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    r = await _call(toolexec, ws, "process_output", {"process_id": "p999-nope"})
    assert r.is_error and "no process 'p999-nope'" in r.content and "process_list" in r.content
    r = await _call(toolexec, ws, "process_signal", {"process_id": "p1", "signal": "HUP"})
    assert r.is_error and "signal" in r.content and '"TERMINATE" | "KILL"' in r.content
    r = await _call(toolexec, ws, "execute", {"command": "true", "timeout_seconds": 99999})
    assert r.is_error and "timeout_seconds" in r.content and "14400" in r.content
    # Processes belong to their workspace: another workspace of the same owner cannot see them.
    r = await _call(toolexec, ws, "execute", {"command": "sleep 30", "run_in_background": True})
    pid_id = json.loads(r.structured_json)["process_id"]
    other = await toolexec.create(name="other")
    r = await _call(toolexec, other, "process_signal", {"process_id": pid_id, "signal": "KILL"})
    assert r.is_error and "no process" in r.content


async def test_output_truncation(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    r = await _call(toolexec, ws, "execute", {"command": "seq 1 100000"})
    info = json.loads(r.structured_json)
    assert info["truncated"] is True and info["exit_code"] == 0
    assert info["total_bytes"] == len("".join(f"{i}\n" for i in range(1, 100001)))
    assert info["output"].startswith("1\n2\n3\n") and info["output"].endswith("99999\n100000\n")
    assert len(info["output"].encode()) <= 32 * 1024 + 100
    assert "truncated" in r.content


async def test_ten_executes_in_parallel(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    loop = asyncio.get_running_loop()
    started = loop.time()
    requests = [call_request(ws, "execute", {"command": f"sleep 0.5; echo job{i}"}) for i in range(10)]
    results = await asyncio.gather(*(stub.CallTool(req) for req in requests))
    elapsed = loop.time() - started
    for i, r in enumerate(results):
        info = json.loads(r.structured_json)
        assert info["exit_code"] == 0 and info["output"] == f"job{i}\n"
    # Sequentially this would take at least 5 s.
    assert elapsed < 4.5


def _agent_pid(toolexec: Toolexec, ws: str) -> int:
    pid = toolexec.server.driver.agent_pid(ws)
    assert pid is not None
    return pid


async def test_delete_workspace_kills_everything_it_ran(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    # Background jobs, a setsid'd process and a double fork: none may outlive the workspace.
    command = (
        "for i in $(seq 1 200); do sleep 600 & done; setsid sleep 600 & (sh -c 'sleep 600 &' &); echo started"
    )
    r = await _call(toolexec, ws, "execute", {"command": command, "timeout_seconds": 30})
    assert json.loads(r.structured_json)["output"] == "started\n", r.content
    agent = _agent_pid(toolexec, ws)
    # The double fork may still be under way when the command's shell has answered.
    ran = await wait_until(
        lambda: reaper.descendants(agent),
        until=lambda ran: len(ran) >= 202,
        what="the 202 sleeps to run under the agent",
    )
    await toolexec.stub().DeleteWorkspace(toolexec_service_pb2.DeleteWorkspaceRequest(workspace_id=ws))
    await wait_until(
        lambda: [p for p in [agent, *ran] if _pid_alive(p)],
        until=lambda alive: not alive,
        what="the agent and everything it ran to be gone",
    )
    assert not ws_exists(toolexec, ws)


async def test_service_stop_keeps_workspace_processes(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    await _call(toolexec, ws, "execute", {"command": "sleep 60", "run_in_background": True})
    agent = _agent_pid(toolexec, ws)
    ran = reaper.descendants(agent)
    await toolexec.server.stop(0)
    # The agent and what it runs live on: a toolexec restart must not kill a workspace's work.
    assert _pid_alive(agent) and ran and all(_pid_alive(p) for p in ran)


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
