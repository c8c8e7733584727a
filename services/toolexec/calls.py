"""CallTool's domain logic: owner check, ledger, validation, routing to the agent, record (no grpc).

Order for a new call: the ledger row is inserted as 'started' (one statement), the call goes
to the workspace's agent with no transaction open, then the row is completed (one statement).
A read-only tool runs first and is then recorded as completed (one statement). A repeated
tool_call_id returns the recorded result with `replayed` set and runs nothing. A row left
'started' by a toolexec that died mid-call is sent to the agent again under the same id: the
agent answers it from its own record (or waits for the run in progress), so it never runs
twice. A call that never reached an agent (offline), or whose outcome is unknown (the
connection was lost for good), is answered with an error result and not recorded, so a retry
with the same id asks the agent again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from services.agent.tools.base import ToolError, ToolResult
from services.agent.tools.exec import DEFAULT_TIMEOUT_SECONDS as DEFAULT_EXECUTE_TIMEOUT_SECONDS
from services.common.auth import Identity
from services.common.errors import AgentplaneError, InvalidArgument
from services.toolexec.ledger import Ledger, LedgerEntry, call_fingerprint
from services.toolexec.metrics import ToolexecMetrics
from services.toolexec.router import (
    AgentOffline,
    AgentOutcomeUnknown,
    AgentRouter,
    offline_result,
    unknown_outcome_result,
)
from services.toolexec.tools.validation import parse_arguments
from services.toolexec.workspaces import WorkspaceManager

log = logging.getLogger(__name__)

MAX_TOOL_CALL_ID_LENGTH = 256
MAX_TOOL_NAME_LENGTH = 128
# Tools without side effects: running one twice is harmless, so the ledger records them once,
# after they ran, instead of marking them started first (one statement per call, not two).
READ_ONLY_TOOLS = frozenset({"read_file"})
# Waiting for an agent's result: the tool's own bound plus this margin (see result_deadline).
RESULT_MARGIN_SECONDS = 60.0
FILE_TOOL_SECONDS = 120.0


@dataclass(frozen=True)
class CallOutcome:
    """The answer to one CallTool."""

    result: ToolResult
    replayed: bool
    duration_seconds: float


def result_deadline(name: str, args: dict[str, Any], timeout_seconds: float | None) -> float:
    """How long to wait for an agent's result before saying the outcome is unknown.

    The call's own time bound (execute's timeout, process_output's wait, the request's timeout)
    plus a margin: an agent that is connected but never answers cannot hold a call forever.
    """
    own = FILE_TOOL_SECONDS
    if name == "execute":
        own = float(args.get("timeout_seconds", DEFAULT_EXECUTE_TIMEOUT_SECONDS))
    elif name == "process_output":
        own = float(args.get("wait_seconds", 0))
    if timeout_seconds is not None:
        own = min(own, timeout_seconds)
    return own + RESULT_MARGIN_SECONDS


def reused_id_result(tool_call_id: str, recorded_tool: str) -> ToolResult:
    """The answer for a tool_call_id reused for a different tool or different arguments."""
    return ToolError(
        f"tool_call_id {tool_call_id!r} was already used in this workspace for a different call "
        f"({recorded_tool} with other arguments); nothing was run. Each tool call needs its own "
        "tool_call_id.",
        code="tool_call_id_reused",
    ).to_result()


def _sanitize(result: ToolResult) -> ToolResult:
    # Postgres text cannot hold NUL; replace it so what is stored is exactly what is returned.
    if "\x00" in result.content:
        return replace(result, content=result.content.replace("\x00", "\ufffd"))
    return result


class ToolCaller:
    """Runs tool calls through the ledger."""

    def __init__(
        self,
        workspaces: WorkspaceManager,
        router: AgentRouter,
        ledger: Ledger,
        metrics: ToolexecMetrics | None = None,
    ) -> None:
        self._workspaces = workspaces
        self._router = router
        self._ledger = ledger
        self._metrics = metrics or ToolexecMetrics.for_registry()
        # Calls running in this process, by (workspace, tool_call_id): a duplicate waits for the first.
        self._inflight: dict[tuple[str, str], tuple[str, asyncio.Task[CallOutcome]]] = {}

    async def call(
        self,
        identity: Identity,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        arguments_json: str,
        timeout_seconds: float | None = None,
    ) -> CallOutcome:
        """Run (or replay) one tool call in a workspace `identity` may touch."""
        started = time.monotonic()
        outcome = await self._call(
            identity, workspace_id, tool_call_id, name, arguments_json, timeout_seconds
        )
        self._metrics.tool_call(name, outcome.result, outcome.replayed, time.monotonic() - started)
        return outcome

    async def _call(
        self,
        identity: Identity,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        arguments_json: str,
        timeout_seconds: float | None,
    ) -> CallOutcome:
        if not tool_call_id:
            raise InvalidArgument("tool_call_id", "is required (the model's id for this call)")
        if len(tool_call_id) > MAX_TOOL_CALL_ID_LENGTH:
            raise InvalidArgument("tool_call_id", f"must be at most {MAX_TOOL_CALL_ID_LENGTH} characters")
        if not name:
            raise InvalidArgument("name", "is required (the tool's name, from ListTools)")
        if len(name) > MAX_TOOL_NAME_LENGTH:
            raise InvalidArgument("name", f"must be at most {MAX_TOOL_NAME_LENGTH} characters")
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise InvalidArgument("timeout", "must be positive (or unset for the tool's default)")
        record = await self._workspaces.get_ready(identity, workspace_id)
        sha = call_fingerprint(name, arguments_json)
        key = (record.id, tool_call_id)
        running = self._inflight.get(key)
        if running is not None:
            first_sha, task = running
            outcome = await asyncio.shield(task)
            if first_sha != sha:
                return CallOutcome(reused_id_result(tool_call_id, name), False, 0.0)
            return replace(outcome, replayed=True)
        task = asyncio.create_task(
            self._process(record.id, tool_call_id, name, arguments_json, sha, timeout_seconds)
        )
        self._inflight[key] = (sha, task)
        task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # Shielded: a caller that goes away does not cancel the run, so the ledger still completes.
        return await asyncio.shield(task)

    async def _process(
        self,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        arguments_json: str,
        sha: str,
        timeout_seconds: float | None,
    ) -> CallOutcome:
        if name in READ_ONLY_TOOLS:
            return await self._process_read_only(
                workspace_id, tool_call_id, name, arguments_json, sha, timeout_seconds
            )
        entry = await self._ledger.begin(workspace_id, tool_call_id, name, sha)
        if entry is not None:
            return await self._answer_recorded(
                entry, workspace_id, tool_call_id, name, sha, arguments_json, timeout_seconds
            )
        return await self._run_and_complete(
            workspace_id, tool_call_id, name, arguments_json, sha, timeout_seconds
        )

    async def _run_and_complete(
        self,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        arguments_json: str,
        sha: str,
        timeout_seconds: float | None,
        replayed: bool = False,
    ) -> CallOutcome:
        """Send the call (its ledger row is 'started') to the agent and record what it answers."""
        started = time.monotonic()
        try:
            result, final = await self._execute(
                workspace_id, tool_call_id, name, arguments_json, sha, timeout_seconds
            )
        except BaseException:
            # Nothing known to have run (or we are going away): a retry asks the agent again.
            await asyncio.shield(self._ledger.forget(workspace_id, tool_call_id))
            raise
        duration = time.monotonic() - started
        if not final:
            await self._ledger.forget(workspace_id, tool_call_id)
            return CallOutcome(result, False, duration)
        await self._ledger.complete(workspace_id, tool_call_id, result, duration * 1000)
        return CallOutcome(result, replayed, duration)

    async def _process_read_only(
        self,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        arguments_json: str,
        sha: str,
        timeout_seconds: float | None,
    ) -> CallOutcome:
        """A call without side effects: run it, then record it (one statement, not two).

        A repeated id is answered from the ledger as always (the read just happens again first).
        """
        started = time.monotonic()
        result, final = await self._execute(
            workspace_id, tool_call_id, name, arguments_json, sha, timeout_seconds
        )
        duration = time.monotonic() - started
        if not final:
            return CallOutcome(result, False, duration)
        entry = await self._ledger.record(workspace_id, tool_call_id, name, sha, result, duration * 1000)
        if entry is not None:
            return await self._answer_recorded(
                entry, workspace_id, tool_call_id, name, sha, arguments_json, timeout_seconds
            )
        return CallOutcome(result, False, duration)

    async def _answer_recorded(
        self,
        entry: LedgerEntry,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        sha: str,
        arguments_json: str,
        timeout_seconds: float | None,
    ) -> CallOutcome:
        """The answer for a tool_call_id the ledger already holds."""
        if entry.arguments_sha256 != sha:
            return CallOutcome(reused_id_result(tool_call_id, entry.tool_name), False, 0.0)
        if entry.completed and entry.result is not None:
            return CallOutcome(entry.result, True, entry.duration_ms / 1000)
        # Started by a toolexec that died (or by another replica, still running it): ask the
        # agent again under the same id; it answers from its record or waits for the run.
        return await self._run_and_complete(
            workspace_id, tool_call_id, name, arguments_json, sha, timeout_seconds, replayed=True
        )

    async def _execute(
        self,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        arguments_json: str,
        sha: str,
        timeout_seconds: float | None,
    ) -> tuple[ToolResult, bool]:
        """Validate and run the tool on the agent; the result, and whether it is final (to record).

        Every failure the model can act on becomes an error result.
        """
        try:
            args = parse_arguments(name, arguments_json)
            result = await self._router.call(
                workspace_id,
                tool_call_id,
                name,
                json.dumps(args, separators=(",", ":")),
                sha,
                timeout_seconds,
                deadline_seconds=result_deadline(name, args, timeout_seconds),
            )
        except ToolError as exc:
            result = exc.to_result()
        except AgentOffline as exc:
            return offline_result(exc.message), False
        except AgentOutcomeUnknown:
            return unknown_outcome_result(name), False
        except AgentplaneError:
            raise
        except Exception:
            log.exception("tool %s failed unexpectedly", name, extra={"workspace_id": workspace_id})
            result = ToolError(
                f"{name} failed with an internal error; it may have partly run. Check the workspace "
                "before retrying.",
                code="internal_error",
            ).to_result()
        return _sanitize(result), True
