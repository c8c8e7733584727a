"""Worker leases on chats: claim, renew, sweep and release.

A worker owns a chat's run through ``worker_id``, ``lease_expires_at`` and the run
``generation`` on the chat row; every write of the run is fenced by (worker_id, generation)
(see `Runs`). Claims skip rows others are locking, so replicas never wait for each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentplane.chat.v1 import chat_pb2
from psycopg import AsyncCursor

from services.chat.domain import Claim, Fence, RenewResult
from services.chat.store.channels import NOTIFY_WATCH, PENDING_CHANNEL
from services.chat.store.eventlog import N, Part, log_ctes, number
from services.chat.store.rows import run_info_from_row, status_event

# Every live worker holds the session-level advisory lock (LIVENESS_CLASS, hashtext(worker_id))
# on a connection of its own (services/chat/liveness.py); Postgres drops it when the session ends.
LIVENESS_CLASS = 0x63686174  # "chat"
TAKE_LIVENESS_LOCK = f"SELECT pg_try_advisory_lock({LIVENESS_CLASS}, hashtext(%s))"
# The lock keys held now, read once per statement (a CTE named `live`). A two-key advisory lock
# shows in pg_locks as classid = key 1, objid = key 2 (as an unsigned oid), objsubid = 2.
_LIVE = (
    "live AS MATERIALIZED (SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    f" AND classid = {LIVENESS_CLASS} AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)
# An owned chat row whose owner can no longer be running it: its lease expired, or its worker's
# liveness lock is gone (the process died or lost its session). Needs `_LIVE`.
_OWNER_GONE = "(lease_expires_at < now() OR hashtext(worker_id)::oid NOT IN (SELECT objid FROM live))"
# Hands an owned chat back (sweep, release, renewal): a run in progress, or an interrupt that asked
# to resume with a queued message, becomes PENDING for any worker; a chat a 'stop' interrupt
# already made WAITING stays so, idle. The new generation fences the old run's writes.
_HAND_BACK = (
    "status = CASE WHEN status = 'running' OR interrupt = 'resume' THEN 'pending' ELSE status END,"
    " interrupt = CASE WHEN interrupt = 'resume' THEN 'resume' END,"
    " worker_id = NULL, lease_expires_at = NULL, generation = generation + 1"
)
# Wakes the claim loops for a handed-back chat that became PENDING (a RETURNING item).
_NOTIFY_IF_PENDING = f"CASE WHEN status = 'pending' THEN pg_notify('{PENDING_CHANNEL}', id::text) END AS _p"


async def owner_gone(cur: AsyncCursor[Any], chat_id: str) -> bool:
    """Whether the chat is owned by a worker that can no longer be running it (see `_OWNER_GONE`)."""
    await cur.execute(
        f"WITH {_LIVE} SELECT worker_id IS NOT NULL AND {_OWNER_GONE} AS gone FROM chat_chats WHERE id = %s",
        (chat_id,),
    )
    row = await cur.fetchone()
    return row is not None and bool(row["gone"])


class Leases(Part):
    """Claim, renew, sweep and release chats for workers."""

    async def claim(self, worker_id: str, limit: int, lease_seconds: float) -> list[Claim]:
        """Acquire up to `limit` pending chats, oldest first, skipping rows others are locking.

        The same statement starts each run (RUNNING event, interrupt flag cleared) and returns
        what the run needs, so a claimed chat costs no `start_run` round trip. Chats whose
        interrupt asked to resume with a queued message are only claimed (no seq taken, no event):
        their run calls `start_run`, which delivers that message.
        """
        if limit <= 0:
            return []
        running = status_event("running")
        # One stored event serves every claimed chat: stored events carry no chat_id (see eventlog).
        log, p = log_ctes(None, [running], only_if="c.interrupt IS NULL")
        p.update(w=worker_id, l=lease_seconds, n=limit)
        async with self._log.stmt() as cur:
            await cur.execute(
                "WITH c AS (UPDATE chat_chats SET status = 'running', worker_id = %(w)s,"
                " generation = generation + 1, lease_expires_at = now() + make_interval(secs => %(l)s),"
                f" last_seq = last_seq + CASE WHEN interrupt = 'resume' THEN 0 ELSE {N} END,"
                " interrupt = CASE WHEN interrupt = 'resume' THEN 'resume' END, updated_at = now()"
                " WHERE id IN (SELECT id FROM chat_chats WHERE status = 'pending' ORDER BY updated_at"
                " FOR UPDATE SKIP LOCKED LIMIT %(n)s)"
                " RETURNING id, generation, last_seq, interrupt, owner_id, model_config_id, workspace_id,"
                f" agents_md, streaming_message_id, {NOTIFY_WATCH}){log}"
                " SELECT * FROM c",
                p,
            )
            rows = await cur.fetchall()
        claims = []
        started: list[tuple[str, chat_pb2.ChatEvent]] = []
        for r in rows:
            chat_id = str(r["id"])
            info = None
            if r["interrupt"] is None:
                info = run_info_from_row(chat_id, r)
                ev = chat_pb2.ChatEvent()
                ev.CopyFrom(running)
                ev.chat_id = chat_id
                number([ev], int(r["last_seq"]))
                started.append((chat_id, ev))
            claims.append(Claim(chat_id, Fence(worker_id, int(r["generation"])), info))
        for chat_id, ev in started:
            await self._log.publish(chat_id, [ev])
        return claims

    async def renew(self, worker_id: str, held: Mapping[str, int], lease_seconds: float) -> RenewResult:
        """Renew the leases of the runs `worker_id` holds (chat id -> generation) in one statement.

        The same statement hands back every other chat the database says `worker_id` owns: a run
        that ended without releasing its chat (its database was away) must not keep it RUNNING
        with a lease nobody uses. Reports what is still held (and interrupted) and what was handed back.
        """
        ids = list(held)
        async with self._log.stmt() as cur:
            await cur.execute(
                "WITH h AS (SELECT * FROM unnest(%(ids)s::uuid[], %(gens)s::bigint[]) AS h(id, generation)),"
                " kept AS (UPDATE chat_chats c SET lease_expires_at = now() + make_interval(secs => %(l)s)"
                " FROM h WHERE c.id = h.id AND c.generation = h.generation AND c.worker_id = %(w)s"
                " RETURNING c.id, c.generation, c.interrupt),"
                f" back AS (UPDATE chat_chats c SET {_HAND_BACK} WHERE c.worker_id = %(w)s"
                " AND NOT EXISTS (SELECT 1 FROM h WHERE h.id = c.id AND h.generation = c.generation)"
                f" RETURNING c.id, {_NOTIFY_IF_PENDING})"
                " SELECT id, generation, interrupt, false AS back FROM kept"
                " UNION ALL SELECT id, NULL, NULL, true FROM back",
                {"ids": ids, "gens": [held[i] for i in ids], "l": lease_seconds, "w": worker_id},
            )
            rows = await cur.fetchall()
        return RenewResult(
            held={str(r["id"]): Fence(worker_id, int(r["generation"])) for r in rows if not r["back"]},
            interrupted={str(r["id"]) for r in rows if r["interrupt"]},
            handed_back={str(r["id"]) for r in rows if r["back"]},
        )

    async def sweep(self) -> list[str]:
        """Hand back chats whose owner is gone (lease expired, or liveness lock released); their ids.

        One statement: a dead replica's chats become PENDING (and wake the claim loops) within a
        sweep interval of its death, not a lease.
        """
        async with self._log.stmt() as cur:
            await cur.execute(
                f"WITH {_LIVE} UPDATE chat_chats SET {_HAND_BACK}"
                " WHERE id IN (SELECT id FROM chat_chats"
                f" WHERE worker_id IS NOT NULL AND {_OWNER_GONE} FOR UPDATE SKIP LOCKED)"
                f" RETURNING id, {_NOTIFY_IF_PENDING}"
            )
            rows = await cur.fetchall()
        return [str(r["id"]) for r in rows]

    async def release(self, chat_id: str, fence: Fence) -> bool:
        """Give a chat back (PENDING when a run was in progress) for any worker to continue; one
        statement. False when the fence no longer matches (the chat is not ours to give back)."""
        async with self._log.stmt() as cur:
            await cur.execute(
                f"UPDATE chat_chats SET {_HAND_BACK}"
                " WHERE id = %s AND worker_id = %s AND generation = %s"
                f" RETURNING id, {_NOTIFY_IF_PENDING}",
                (chat_id, fence.worker_id, fence.generation),
            )
            return await cur.fetchone() is not None
