"""CallTool's domain logic: owner check, ledger, validation, run, record (no grpc).

Order for a new call: the ledger row is inserted as 'started' (one statement), the tool
runs with no transaction open, then the row is completed (one statement). A read-only tool
runs first and is then recorded as completed (one statement). A repeated
tool_call_id returns the recorded result with `replayed` set and runs nothing. A row left
'started' by a service that died mid-call is answered with an "interrupted" error result,
recorded so that every later retry gets the same answer; the call is never re-run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

from services.agent.tools.base import ToolError, ToolResult
from services.common.auth import Identity
from services.common.errors import AgentplaneError, InvalidArgument
from services.toolexec.driver import WorkspaceDriver
from services.toolexec.ledger import Ledger, LedgerEntry, call_fingerprint
from services.toolexec.tools.validation import parse_arguments
from services.toolexec.workspaces import WorkspaceManager

log = logging.getLogger(__name__)

MAX_TOOL_CALL_ID_LENGTH = 256
MAX_TOOL_NAME_LENGTH = 128
# Tools without side effects: running one twice is harmless, so the ledger records them once,
# after they ran, instead of marking them started first (one statement per call, not two).
READ_ONLY_TOOLS = frozenset({"read_file"})


@dataclass(frozen=True)
class CallOutcome:
    """The answer to one CallTool."""

    result: ToolResult
    replayed: bool
    duration_seconds: float


def interrupted_result(tool_call_id: str, name: str) -> ToolResult:
    """The answer for a call whose earlier attempt was cut off by a toolexec restart."""
    return ToolError(
        f"the previous attempt of this {name} call (tool_call_id {tool_call_id!r}) was interrupted by a "
        "toolexec restart and may have partly run; it was not run again. Check the workspace state "
        "(for example with read_file or execute) before retrying with a new tool call.",
        code="interrupted",
    ).to_result()


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

    def __init__(self, workspaces: WorkspaceManager, driver: WorkspaceDriver, ledger: Ledger) -> None:
        self._workspaces = workspaces
        self._driver = driver
        self._ledger = ledger
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
            return await self._answer_recorded(entry, workspace_id, tool_call_id, name, sha)
        started = time.monotonic()
        try:
            result = await self._execute(workspace_id, name, arguments_json, timeout_seconds)
        except AgentplaneError:
            # The workspace cannot run tools (its directory is gone): nothing ran, so no record.
            await self._ledger.forget(workspace_id, tool_call_id)
            raise
        duration = time.monotonic() - started
        await self._ledger.complete(workspace_id, tool_call_id, result, duration * 1000)
        return CallOutcome(result, False, duration)

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
        result = await self._execute(workspace_id, name, arguments_json, timeout_seconds)
        duration = time.monotonic() - started
        entry = await self._ledger.record(workspace_id, tool_call_id, name, sha, result, duration * 1000)
        if entry is not None:
            return await self._answer_recorded(entry, workspace_id, tool_call_id, name, sha)
        return CallOutcome(result, False, duration)

    async def _answer_recorded(
        self, entry: LedgerEntry, workspace_id: str, tool_call_id: str, name: str, sha: str
    ) -> CallOutcome:
        """The answer for a tool_call_id the ledger already holds."""
        if entry.arguments_sha256 != sha:
            return CallOutcome(reused_id_result(tool_call_id, entry.tool_name), False, 0.0)
        if entry.completed and entry.result is not None:
            return CallOutcome(entry.result, True, entry.duration_ms / 1000)
        result = interrupted_result(tool_call_id, name)
        if not await self._ledger.complete(workspace_id, tool_call_id, result, 0.0, interrupted=True):
            # Completed meanwhile by someone else: answer with what they recorded.
            again = await self._ledger.begin(workspace_id, tool_call_id, name, sha)
            if again is not None and again.result is not None:
                return CallOutcome(again.result, True, again.duration_ms / 1000)
        return CallOutcome(result, True, 0.0)

    async def _execute(
        self, workspace_id: str, name: str, arguments_json: str, timeout_seconds: float | None
    ) -> ToolResult:
        """Validate and run the tool; every failure the model can act on becomes an error result."""
        try:
            args = parse_arguments(name, arguments_json)
            result = await self._driver.run_tool(workspace_id, name, args, timeout_seconds)
        except ToolError as exc:
            result = exc.to_result()
        except AgentplaneError:
            raise
        except Exception:
            log.exception("tool %s failed unexpectedly", name, extra={"workspace_id": workspace_id})
            result = ToolError(
                f"{name} failed with an internal error; it may have partly run. Check the workspace "
                "before retrying.",
                code="internal_error",
            ).to_result()
        return _sanitize(result)
