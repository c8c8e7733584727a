"""Workspace records in Postgres (toolexec_workspaces). Each method is one short statement."""

from __future__ import annotations

import builtins
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

STATE_CREATING = "creating"
STATE_READY = "ready"
STATE_FAILED = "failed"

_COLUMNS = (
    "id, owner_id, name, template_id, parameters, state, failure_message, create_time, update_time, driver"
)


@dataclass(frozen=True)
class WorkspaceRecord:
    """A row of toolexec_workspaces."""

    id: str
    owner_id: str
    name: str
    template_id: str
    state: str
    failure_message: str
    create_time: dt.datetime
    update_time: dt.datetime
    parameters: dict[str, str] = field(default_factory=dict)
    driver: str = "local"


def _record(row: dict[str, Any]) -> WorkspaceRecord:
    return WorkspaceRecord(
        id=row["id"],
        owner_id=row["owner_id"],
        name=row["name"],
        template_id=row["template_id"],
        state=row["state"],
        failure_message=row["failure_message"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        parameters=dict(row["parameters"] or {}),
        driver=row["driver"],
    )


class WorkspaceStore:
    """CRUD on workspace records (autocommit pool)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def insert(
        self,
        workspace_id: str,
        owner_id: str,
        name: str,
        template_id: str,
        parameters: dict[str, str],
        request_id: str | None,
        driver: str = "local",
        agent_token_sha256: str | None = None,
    ) -> WorkspaceRecord | None:
        """Insert a 'creating' record; None when (owner, request_id) already exists."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO toolexec_workspaces (id, owner_id, name, template_id, parameters, state, "
                "request_id, driver, agent_token_sha256) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                f"ON CONFLICT DO NOTHING RETURNING {_COLUMNS}",
                (
                    workspace_id,
                    owner_id,
                    name,
                    template_id,
                    Jsonb(parameters),
                    STATE_CREATING,
                    request_id,
                    driver,
                    agent_token_sha256,
                ),
            )
            row = await cur.fetchone()
        return _record(row) if row else None

    async def by_request(self, owner_id: str, request_id: str) -> WorkspaceRecord | None:
        """The workspace created earlier by this owner with this request id."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM toolexec_workspaces WHERE owner_id = %s AND request_id = %s",
                (owner_id, request_id),
            )
            row = await cur.fetchone()
        return _record(row) if row else None

    async def get(self, workspace_id: str) -> WorkspaceRecord | None:
        """The record, or None."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM toolexec_workspaces WHERE id = %s", (workspace_id,)
            )
            row = await cur.fetchone()
        return _record(row) if row else None

    async def set_state(
        self, workspace_id: str, state: str, failure_message: str = ""
    ) -> WorkspaceRecord | None:
        """Move a workspace to `state`; returns the updated record."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"UPDATE toolexec_workspaces SET state = %s, failure_message = %s, update_time = now() "
                f"WHERE id = %s RETURNING {_COLUMNS}",
                (state, failure_message, workspace_id),
            )
            row = await cur.fetchone()
        return _record(row) if row else None

    async def list(
        self, owner_id: str, limit: int, after: tuple[dt.datetime, str] | None
    ) -> list[WorkspaceRecord]:
        """Up to `limit` workspaces of `owner_id`, newest first, after the keyset position `after`."""
        async with self._pool.connection() as conn:
            if after is None:
                cur = await conn.execute(
                    f"SELECT {_COLUMNS} FROM toolexec_workspaces WHERE owner_id = %s "
                    "ORDER BY create_time DESC, id DESC LIMIT %s",
                    (owner_id, limit),
                )
            else:
                cur = await conn.execute(
                    f"SELECT {_COLUMNS} FROM toolexec_workspaces WHERE owner_id = %s "
                    "AND (create_time, id) < (%s, %s) ORDER BY create_time DESC, id DESC LIMIT %s",
                    (owner_id, after[0], after[1], limit),
                )
            rows = await cur.fetchall()
        return [_record(r) for r in rows]

    async def delete(self, workspace_id: str) -> bool:
        """Remove the record (and, by cascade, its ledger); False when it was already gone."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM toolexec_workspaces WHERE id = %s RETURNING id", (workspace_id,)
            )
            row = await cur.fetchone()
        return row is not None

    async def set_agent_token(self, workspace_id: str, token_sha256: str) -> bool:
        """Replace the workspace's agent token hash; False when the workspace is gone."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE toolexec_workspaces SET agent_token_sha256 = %s WHERE id = %s RETURNING id",
                (token_sha256, workspace_id),
            )
            row = await cur.fetchone()
        return row is not None

    async def by_agent_token(self, token_sha256: str) -> WorkspaceRecord | None:
        """The workspace whose agent token has this hash."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM toolexec_workspaces WHERE agent_token_sha256 = %s",
                (token_sha256,),
            )
            row = await cur.fetchone()
        return _record(row) if row else None

    async def agent_token_hashes(self, workspace_ids: builtins.list[str]) -> dict[str, str | None]:
        """The current agent token hash of each workspace that still exists."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, agent_token_sha256 FROM toolexec_workspaces WHERE id = ANY(%s)", (workspace_ids,)
            )
            rows = await cur.fetchall()
        return {r["id"]: r["agent_token_sha256"] for r in rows}

    async def fail_stale_creating(self, older_than_seconds: float, message: str) -> builtins.list[str]:
        """Mark workspaces left CREATING for longer than the bound FAILED; returns their ids."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE toolexec_workspaces SET state = %s, failure_message = %s, update_time = now() "
                "WHERE state = %s AND update_time < now() - make_interval(secs => %s) RETURNING id",
                (STATE_FAILED, message, STATE_CREATING, older_than_seconds),
            )
            rows = await cur.fetchall()
        return [r["id"] for r in rows]
