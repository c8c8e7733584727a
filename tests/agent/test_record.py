"""The agent's record of calls and its exactly-once rules, without servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.agent.calls import AgentCalls
from services.agent.processes import ProcessLimits, ProcessManager
from services.agent.record import DONE, JOURNAL, STARTED, ResultRecord
from services.agent.runner import ToolRunner
from services.agent.tools.base import ToolResult


def test_record_survives_a_restart_and_stays_bounded(tmp_path: Path) -> None:
    record = ResultRecord(str(tmp_path), max_entries=10)
    for i in range(35):
        record.started(f"c{i}", "sha")
        record.done(f"c{i}", "sha", ToolResult(f"out {i}", {"i": i}), 0.5)
    record.started("cut", "sha-cut")
    record.close()
    # The journal was compacted: it never holds more than twice the bound.
    assert len((tmp_path / JOURNAL).read_bytes().splitlines()) <= 20
    again = ResultRecord(str(tmp_path), max_entries=10)
    assert len(again) == 10 and again.get("c0") is None
    entry = again.get("c34")
    assert entry is not None and entry.state == DONE and entry.result == ToolResult("out 34", {"i": 34})
    cut = again.get("cut")
    assert cut is not None and cut.state == STARTED and cut.arguments_sha256 == "sha-cut"


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    record = ResultRecord(str(tmp_path))
    record.done("ok", "sha", ToolResult("fine"), 0.1)
    record.close()
    with open(tmp_path / JOURNAL, "ab") as f:
        f.write(b'{"id":"half","sha":"x","sta')
    again = ResultRecord(str(tmp_path))
    assert again.get("half") is None and again.get("ok") is not None


async def test_calls_run_once_replay_refuse_and_report_unknown(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    state = tmp_path / "state"
    processes = ProcessManager(str(state / "processes"), ProcessLimits())
    calls = AgentCalls(ToolRunner(str(root), processes), ResultRecord(str(state / "calls")))
    args = '{"command": "echo once >> side.txt; echo ran"}'
    # Two sends of one id at once (a re-send after a reconnect): one run, both get its result.
    first, second = await asyncio.gather(
        calls.call("a", "execute", args, "sha-a", None), calls.call("a", "execute", args, "sha-a", None)
    )
    assert first.result == second.result and {first.replayed, second.replayed} == {False, True}
    replay = await calls.call("a", "execute", args, "sha-a", None)
    assert replay.replayed and replay.result == first.result
    reused = await calls.call("a", "execute", '{"command": "rm -rf ."}', "sha-other", None)
    assert reused.result.is_error and reused.result.structured["error"] == "tool_call_id_reused"
    assert (root / "side.txt").read_text() == "once\n"
    # An agent restart (a new record over the same journal) while a call had started: unknown.
    calls.record.started("cut", "sha-cut")
    calls.record.close()
    restarted = AgentCalls(ToolRunner(str(root), processes), ResultRecord(str(state / "calls")))
    unknown = await restarted.call("cut", "execute", args, "sha-cut", None)
    assert unknown.result.is_error and "may have run" in unknown.result.content
    assert (await restarted.call("a", "execute", args, "sha-a", None)).replayed
    assert (root / "side.txt").read_text() == "once\n"
    await processes.close()
