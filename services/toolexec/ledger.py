"""The tool-call ledger in Postgres, keyed by (workspace, tool_call_id).

Two short autocommit statements per call: `begin` records the call as started (or returns
the earlier record, in the same round trip) before the tool runs, `complete` stores the
result after. A read-only call (nothing to protect from a second run) takes one: `record`
stores it as completed after it ran. No transaction is ever open while a tool runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from services.agent.tools.base import ToolResult
from services.common.errors import NotFound

# Insert the 'started' row, or (when the key exists) return the recorded row instead.
_BEGIN = """
WITH ins AS (
    INSERT INTO toolexec_tool_calls
        (workspace_id, tool_call_id, tool_name, arguments_sha256, state, instance_id)
    VALUES (%(ws)s, %(id)s, %(name)s, %(sha)s, 'started', %(instance)s)
    ON CONFLICT (workspace_id, tool_call_id) DO NOTHING
    RETURNING true AS inserted
)
SELECT true AS inserted, NULL AS tool_name, NULL AS arguments_sha256, NULL AS state,
       NULL AS content, NULL AS structured_json, NULL::boolean AS is_error, NULL::float8 AS duration_ms
FROM ins
UNION ALL
SELECT false, tool_name, arguments_sha256, state, content, structured_json, is_error, duration_ms
FROM toolexec_tool_calls
WHERE workspace_id = %(ws)s AND tool_call_id = %(id)s AND NOT EXISTS (SELECT 1 FROM ins)
"""
# A read-only call, recorded once it ran: insert the completed row, or (when the key exists)
# return the recorded row instead, as `_BEGIN` does.
_RECORD = """
WITH ins AS (
    INSERT INTO toolexec_tool_calls
        (workspace_id, tool_call_id, tool_name, arguments_sha256, state, instance_id, content,
         structured_json, is_error, duration_ms, completed_at)
    VALUES (%(ws)s, %(id)s, %(name)s, %(sha)s, 'completed', %(instance)s, %(content)s, %(structured)s,
            %(is_error)s, %(ms)s, now())
    ON CONFLICT (workspace_id, tool_call_id) DO NOTHING
    RETURNING true AS inserted
)
SELECT true AS inserted, NULL AS tool_name, NULL AS arguments_sha256, NULL AS state,
       NULL AS content, NULL AS structured_json, NULL::boolean AS is_error, NULL::float8 AS duration_ms
FROM ins
UNION ALL
SELECT false, tool_name, arguments_sha256, state, content, structured_json, is_error, duration_ms
FROM toolexec_tool_calls
WHERE workspace_id = %(ws)s AND tool_call_id = %(id)s AND NOT EXISTS (SELECT 1 FROM ins)
"""
_SELECT = """
SELECT false AS inserted, tool_name, arguments_sha256, state, content, structured_json, is_error, duration_ms
FROM toolexec_tool_calls WHERE workspace_id = %(ws)s AND tool_call_id = %(id)s
"""
_COMPLETE = """
UPDATE toolexec_tool_calls
SET state = 'completed', content = %(content)s, structured_json = %(structured)s, is_error = %(is_error)s,
    duration_ms = %(ms)s, interrupted = %(interrupted)s, completed_at = now()
WHERE workspace_id = %(ws)s AND tool_call_id = %(id)s AND state = 'started'
RETURNING true AS updated
"""


def call_fingerprint(name: str, arguments_json: str) -> str:
    """SHA-256 of the tool name and the arguments (canonical JSON when it parses, else the raw text)."""
    try:
        canonical = json.dumps(json.loads(arguments_json or "{}"), sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        canonical = arguments_json
    return hashlib.sha256(f"{name}\x00{canonical}".encode()).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    """A recorded call found by `begin`."""

    tool_name: str
    arguments_sha256: str
    completed: bool
    result: ToolResult | None
    duration_ms: float


class Ledger:
    """Reads and writes toolexec_tool_calls (through an autocommit pool)."""

    def __init__(self, pool: AsyncConnectionPool[Any], instance_id: str) -> None:
        self._pool = pool
        self._instance = instance_id

    async def begin(self, workspace_id: str, tool_call_id: str, name: str, sha: str) -> LedgerEntry | None:
        """Record the call as started; None if we did (run it), else the earlier record."""
        params = {
            "ws": workspace_id,
            "id": tool_call_id,
            "name": name,
            "sha": sha,
            "instance": self._instance,
        }
        return await self._insert_or_earlier(_BEGIN, params)

    async def record(
        self,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        sha: str,
        result: ToolResult,
        duration_ms: float,
    ) -> LedgerEntry | None:
        """Record a read-only call that already ran as completed, in one statement.

        None if we did (our result stands), else the earlier record, which the caller returns
        instead: a read may run twice, but every answer to one tool_call_id is the recorded one.
        """
        params = {
            "ws": workspace_id,
            "id": tool_call_id,
            "name": name,
            "sha": sha,
            "instance": self._instance,
            "content": result.content,
            "structured": json.dumps(result.structured, separators=(",", ":")),
            "is_error": result.is_error,
            "ms": duration_ms,
        }
        return await self._insert_or_earlier(_RECORD, params)

    async def _insert_or_earlier(self, statement: str, params: dict[str, Any]) -> LedgerEntry | None:
        async with self._pool.connection() as conn:
            try:
                cur = await conn.execute(statement, params)
            except psycopg.errors.ForeignKeyViolation:
                # Deleted meanwhile (through another replica, whose delete this one's cache missed).
                raise NotFound(
                    f"workspace {params['ws']} not found",
                    reason="WORKSPACE_NOT_FOUND",
                    metadata={"workspace_id": params["ws"]},
                ) from None
            row = await cur.fetchone()
            if row is None:
                # A concurrent insert committed after this statement's snapshot: read it now.
                cur = await conn.execute(_SELECT, params)
                row = await cur.fetchone()
        if row is None:
            raise RuntimeError(f"ledger row for {params['ws']}/{params['id']} vanished")
        if row["inserted"]:
            return None
        completed = row["state"] == "completed"
        result = None
        if completed:
            result = ToolResult(
                content=row["content"] or "",
                structured=json.loads(row["structured_json"] or "{}"),
                is_error=bool(row["is_error"]),
            )
        return LedgerEntry(
            row["tool_name"], row["arguments_sha256"], completed, result, row["duration_ms"] or 0
        )

    async def complete(
        self,
        workspace_id: str,
        tool_call_id: str,
        result: ToolResult,
        duration_ms: float,
        *,
        interrupted: bool = False,
    ) -> bool:
        """Store the result of a started call; False if it was no longer 'started'."""
        params = {
            "ws": workspace_id,
            "id": tool_call_id,
            "content": result.content,
            "structured": json.dumps(result.structured, separators=(",", ":")),
            "is_error": result.is_error,
            "ms": duration_ms,
            "interrupted": interrupted,
        }
        async with self._pool.connection() as conn:
            cur = await conn.execute(_COMPLETE, params)
            row = await cur.fetchone()
        return row is not None

    async def forget(self, workspace_id: str, tool_call_id: str) -> None:
        """Drop a 'started' row for a call that provably did not run (so a retry may run it)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "DELETE FROM toolexec_tool_calls "
                "WHERE workspace_id = %s AND tool_call_id = %s AND state = 'started'",
                (workspace_id, tool_call_id),
            )
