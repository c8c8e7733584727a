"""Revoked tokens in Postgres (token_revocations). Each method is one short statement."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

_COLUMNS = "token_id, expire_time, revoke_time, revoked_by, reason"


@dataclass(frozen=True)
class Revocation:
    """One revoked token."""

    token_id: str
    expire_time: dt.datetime
    revoke_time: dt.datetime
    revoked_by: str
    reason: str = ""


def _row(row: dict[str, Any]) -> Revocation:
    return Revocation(
        row["token_id"], row["expire_time"], row["revoke_time"], row["revoked_by"], row["reason"]
    )


class RevocationStore:
    """Revocations (autocommit statements)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def revoke(
        self, token_id: str, expire_time: dt.datetime, revoked_by: str, reason: str
    ) -> Revocation:
        """Revoke `token_id`; a repeat returns the first revocation."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"WITH ins AS (INSERT INTO token_revocations ({_COLUMNS}) VALUES (%s, %s, now(), %s, %s) "
                f"ON CONFLICT (token_id) DO NOTHING RETURNING {_COLUMNS}) "
                f"SELECT {_COLUMNS} FROM ins UNION ALL "
                f"SELECT {_COLUMNS} FROM token_revocations "
                "WHERE token_id = %s AND NOT EXISTS (SELECT 1 FROM ins)",
                (token_id, expire_time, revoked_by, reason, token_id),
            )
            row = await cur.fetchone()
        assert row is not None
        return _row(row)

    async def active(self, after_token_id: str, limit: int) -> list[Revocation]:
        """Revocations of tokens not expired yet, by token id, after `after_token_id`."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM token_revocations WHERE expire_time > now() AND token_id > %s "
                "ORDER BY token_id LIMIT %s",
                (after_token_id, limit),
            )
            rows = await cur.fetchall()
        return [_row(r) for r in rows]
