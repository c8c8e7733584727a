"""Where each workspace's agent is connected (toolexec_agents). Each method is one short statement.

A replica that accepts an agent's connection writes a row with a fresh connection id; a newer
connection (to any replica) overwrites it. Only the holder of the current connection id may
mark it closed, so a late close of an old connection never hides a newer one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

_COLUMNS = (
    "workspace_id, connection_id, replica_id, replica_address, connected, version, capabilities, "
    "connect_time, last_seen"
)


@dataclass(frozen=True)
class AgentInfo:
    """A workspace agent's connection as last recorded."""

    workspace_id: str
    connection_id: str
    replica_id: str
    replica_address: str
    connected: bool
    version: str
    connect_time: dt.datetime
    last_seen: dt.datetime
    capabilities: tuple[str, ...] = field(default_factory=tuple)


def _info(row: dict[str, Any]) -> AgentInfo:
    return AgentInfo(
        workspace_id=row["workspace_id"],
        connection_id=row["connection_id"],
        replica_id=row["replica_id"],
        replica_address=row["replica_address"],
        connected=row["connected"],
        version=row["version"],
        connect_time=row["connect_time"],
        last_seen=row["last_seen"],
        capabilities=tuple(row["capabilities"] or ()),
    )


class AgentStore:
    """Agent connection records (autocommit pool)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def connected(
        self,
        workspace_id: str,
        connection_id: str,
        replica_id: str,
        replica_address: str,
        version: str,
        capabilities: Sequence[str],
    ) -> None:
        """Record a new connection (replacing whatever was recorded)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                f"INSERT INTO toolexec_agents ({_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, true, %s, %s, now(), now()) "
                "ON CONFLICT (workspace_id) DO UPDATE SET connection_id = EXCLUDED.connection_id, "
                "replica_id = EXCLUDED.replica_id, replica_address = EXCLUDED.replica_address, "
                "connected = true, version = EXCLUDED.version, capabilities = EXCLUDED.capabilities, "
                "connect_time = now(), last_seen = now()",
                (
                    workspace_id,
                    connection_id,
                    replica_id,
                    replica_address,
                    version,
                    Jsonb(list(capabilities)),
                ),
            )

    async def seen(self, connection_ids: Sequence[str]) -> None:
        """Refresh last_seen of these connections (one statement for all of a replica's agents)."""
        if not connection_ids:
            return
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE toolexec_agents SET last_seen = now() WHERE connection_id = ANY(%s)",
                (list(connection_ids),),
            )

    async def disconnected(self, workspace_id: str, connection_id: str) -> None:
        """Mark the connection closed, if it is still the current one."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE toolexec_agents SET connected = false, last_seen = now() "
                "WHERE workspace_id = %s AND connection_id = %s",
                (workspace_id, connection_id),
            )

    async def replica_gone(self, replica_id: str) -> None:
        """Mark every connection of a replica closed (it stopped, or restarted under the same id)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE toolexec_agents SET connected = false WHERE replica_id = %s AND connected",
                (replica_id,),
            )

    async def get(self, workspace_id: str) -> AgentInfo | None:
        """The recorded connection of a workspace's agent, or None if it never connected."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM toolexec_agents WHERE workspace_id = %s", (workspace_id,)
            )
            row = await cur.fetchone()
        return _info(row) if row else None

    async def get_many(self, workspace_ids: Sequence[str]) -> dict[str, AgentInfo]:
        """The recorded connections of several workspaces' agents."""
        if not workspace_ids:
            return {}
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM toolexec_agents WHERE workspace_id = ANY(%s)", (list(workspace_ids),)
            )
            rows = await cur.fetchall()
        return {r["workspace_id"]: _info(r) for r in rows}
