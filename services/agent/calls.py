"""The agent's side of exactly once: each tool_call_id runs at most once, whatever drops.

A call is answered, in this order: from the record when it already ran (`replayed`); by waiting
for the run in progress when it is running now (a re-send after a reconnect); as "may have run"
when the record says it started but no run is in memory (the agent restarted mid-call); by
refusing when the id was used for other arguments; otherwise it runs. Read-only tools are not
recorded (running one twice changes nothing; toolexec's ledger keeps its answer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.agent.record import DONE, ResultRecord
from services.agent.runner import ToolRunner
from services.agent.tools.base import ToolError, ToolResult

log = logging.getLogger(__name__)

READ_ONLY_TOOLS = frozenset({"read_file", "process_list"})


@dataclass(frozen=True)
class CallAnswer:
    """The agent's answer to one call."""

    result: ToolResult
    replayed: bool
    duration_seconds: float


def unknown_outcome_result(tool_call_id: str, name: str) -> ToolResult:
    """The answer for a call whose run was cut off by an agent restart."""
    return ToolError(
        f"the workspace agent restarted while this {name} call (tool_call_id {tool_call_id!r}) was "
        "running, so its outcome is unknown: the command may have run, fully or in part. Check the "
        "workspace (for example with read_file or execute) before repeating it under a new tool call.",
        code="outcome_unknown",
    ).to_result()


def reused_id_result(tool_call_id: str) -> ToolResult:
    """The answer for a tool_call_id the agent already ran with other arguments."""
    return ToolError(
        f"tool_call_id {tool_call_id!r} was already used in this workspace for a different call; "
        "nothing was run. Each tool call needs its own tool_call_id.",
        code="tool_call_id_reused",
    ).to_result()


class AgentCalls:
    """Runs calls through the record; duplicates of a running call wait for it."""

    def __init__(self, runner: ToolRunner, record: ResultRecord) -> None:
        self.runner = runner
        self.record = record
        self._running: dict[str, tuple[str, asyncio.Task[CallAnswer]]] = {}
        self._listeners: dict[str, Callable[[str], None]] = {}

    def running_ids(self) -> list[str]:
        """The ids of the calls running now."""
        return list(self._running)

    async def call(
        self,
        tool_call_id: str,
        name: str,
        arguments_json: str,
        arguments_sha256: str,
        max_seconds: float | None,
        on_output: Callable[[str], None] | None = None,
    ) -> CallAnswer:
        """Run (or answer from the record) one call."""
        running = self._running.get(tool_call_id)
        if running is not None:
            sha, task = running
            if sha != arguments_sha256:
                return CallAnswer(reused_id_result(tool_call_id), False, 0.0)
            if on_output is not None:
                # The run's output now goes to whoever asked last (the connection after a reconnect).
                self._listeners[tool_call_id] = on_output
            answer = await asyncio.shield(task)
            return CallAnswer(answer.result, True, answer.duration_seconds)
        entry = self.record.get(tool_call_id)
        if entry is not None:
            if entry.arguments_sha256 != arguments_sha256:
                return CallAnswer(reused_id_result(tool_call_id), False, 0.0)
            if entry.state == DONE and entry.result is not None:
                return CallAnswer(entry.result, True, entry.duration_seconds)
            result = unknown_outcome_result(tool_call_id, name)
            self.record.done(tool_call_id, arguments_sha256, result, 0.0)
            return CallAnswer(result, True, 0.0)
        if on_output is not None:
            self._listeners[tool_call_id] = on_output
        task = asyncio.create_task(
            self._run(tool_call_id, name, arguments_json, arguments_sha256, max_seconds)
        )
        self._running[tool_call_id] = (arguments_sha256, task)
        # A caller that goes away (a dropped connection) does not stop the run; its result is recorded.
        return await asyncio.shield(task)

    async def _run(
        self, tool_call_id: str, name: str, arguments_json: str, sha: str, max_seconds: float | None
    ) -> CallAnswer:
        recorded = name not in READ_ONLY_TOOLS
        try:
            try:
                args: Any = json.loads(arguments_json) if arguments_json else {}
            except (ValueError, RecursionError):
                args = None
            if not isinstance(args, dict):
                result = ToolError(
                    "the arguments are not a JSON object", code="invalid_arguments"
                ).to_result()
                return CallAnswer(result, False, 0.0)
            if recorded:
                self.record.started(tool_call_id, sha)
            started = time.monotonic()
            result = await self.runner.run(name, args, max_seconds, self._output_sender(tool_call_id))
            duration = time.monotonic() - started
            if recorded:
                self.record.done(tool_call_id, sha, result, duration)
            return CallAnswer(result, False, duration)
        finally:
            self._running.pop(tool_call_id, None)
            self._listeners.pop(tool_call_id, None)

    def _output_sender(self, tool_call_id: str) -> Callable[[str], None]:
        def send(text: str) -> None:
            # Looked up on every chunk: after a reconnect the re-sent call brings the new sender.
            listener = self._listeners.get(tool_call_id)
            if listener is not None:
                listener(text)

        return send
