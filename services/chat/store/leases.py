"""Worker leases on chats: claim, renew, sweep and release.

A worker owns a chat's run through ``worker_id``, ``lease_expires_at`` and the run
``generation`` on the chat row; every write of the run is fenced by (worker_id, generation)
(see `Runs`). Claims skip rows others are locking, so replicas never wait for each other.
"""

from __future__ import annotations

from agentplane.chat.v1 import chat_pb2

from services.chat.domain import Claim, Fence, RenewResult
from services.chat.store.channels import NOTIFY_WATCH, PENDING_CHANNEL
from services.chat.store.eventlog import N, Part, log_ctes, number
from services.chat.store.rows import run_info_from_row, status_event


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
                f" agents_md, {NOTIFY_WATCH}){log}"
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

    async def renew(self, worker_id: str, lease_seconds: float) -> RenewResult:
        """Renew every lease of `worker_id` in one statement; report what it still holds."""
        async with self._log.stmt() as cur:
            await cur.execute(
                "UPDATE chat_chats SET lease_expires_at = now() + make_interval(secs => %s)"
                " WHERE worker_id = %s RETURNING id, generation, interrupt",
                (lease_seconds, worker_id),
            )
            rows = await cur.fetchall()
        return RenewResult(
            held={str(r["id"]): Fence(worker_id, int(r["generation"])) for r in rows},
            interrupted={str(r["id"]) for r in rows if r["interrupt"]},
        )

    async def sweep(self) -> list[str]:
        """Return chats whose lease expired to PENDING (or release interrupted ones); their ids."""
        async with self._log.tx() as cur:
            await cur.execute(
                "UPDATE chat_chats SET"
                " status = CASE WHEN status = 'running' OR interrupt = 'resume' THEN 'pending'"
                " ELSE status END,"
                " interrupt = CASE WHEN interrupt = 'resume' THEN 'resume' ELSE NULL END,"
                " worker_id = NULL, lease_expires_at = NULL, generation = generation + 1"
                " WHERE id IN (SELECT id FROM chat_chats"
                " WHERE worker_id IS NOT NULL AND lease_expires_at < now()"
                " FOR UPDATE SKIP LOCKED) RETURNING id, status"
            )
            rows = await cur.fetchall()
            pending = [str(r["id"]) for r in rows if r["status"] == "pending"]
            for cid in pending:
                await cur.execute("SELECT pg_notify(%s, %s)", (PENDING_CHANNEL, cid))
        return [str(r["id"]) for r in rows]

    async def release(self, chat_id: str, fence: Fence) -> None:
        """Give a chat back as PENDING (worker shutting down); another worker continues it."""
        async with self._log.tx() as cur:
            await cur.execute(
                "UPDATE chat_chats SET status = CASE WHEN status = 'running' THEN 'pending' ELSE status END,"
                " worker_id = NULL, lease_expires_at = NULL, generation = generation + 1"
                " WHERE id = %s AND worker_id = %s AND generation = %s RETURNING status",
                (chat_id, fence.worker_id, fence.generation),
            )
            row = await cur.fetchone()
            if row is not None and row["status"] == "pending":
                await cur.execute("SELECT pg_notify(%s, %s)", (PENDING_CHANNEL, chat_id))
