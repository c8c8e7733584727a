"""`agentplane demo` (`make demo`): the stack comes up, the simulator plays the model, every tool
runs through the workspace agent in its sandbox, the demo checks the tests pass itself, prints a
summary and stops everything."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from services.cli import data_dir_lock


def _env(database_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        env.pop(key, None)
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, AGENTPLANE_LOG_LEVEL="WARNING")
    return env


async def _agentplane(env: dict[str, str], *argv: str, within: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.timeout(240)
async def test_demo_fixes_the_failing_test_offline_and_stops_the_stack(
    empty_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "demo"
    env = _env(empty_database_url, redis_url)
    code, out, err = await _agentplane(env, "demo", "--data-dir", str(data_dir), "-o", "json", within=200)
    assert code == 0, f"demo failed:\n{err}"
    summary = json.loads(out)
    assert summary["tests_pass"] is True
    assert summary["status"] == "waiting"
    assert summary["offline"] is True
    # The bundled script: run the tests, read the code, fix it, run the tests again, answer.
    assert summary["steps"] == 5 and summary["tool_calls"] == 4
    assert summary["input_tokens"] == 10280 and summary["output_tokens"] == 247
    # The conversation streamed live (on stderr under -o json): the tool calls and their real output.
    assert "→ execute(command=python3 -m unittest -v 2>&1)" in err
    assert "FAIL: test_average" in err  # the first run, before the fix, really failed in the sandbox
    assert "+    return sum(values) / len(values)" in err
    # Everything stopped: the data directory's lock is free again.
    data_dir_lock.acquire(data_dir).release()
    # The demo's workspace is deleted unless --keep.
    assert (data_dir / "workspaces").is_dir()
    assert not (data_dir / "workspaces" / summary["workspace_id"]).exists()


async def test_up_refuses_a_broken_simulator_script_before_starting_anything(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text('{"conversations": [{"turns": [{"fault": {"kind": "no-such-fault"}}]}]}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    env["AGENTPLANE_DATA_DIR"] = str(tmp_path / "data")
    code, _, err = await _agentplane(env, "up", "--simulator-script", str(script), within=30)
    assert code == 2
    assert "--simulator-script" in err and "fault.kind must be one of" in err
    assert not (tmp_path / "data").exists()
