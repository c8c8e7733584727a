"""Chats as their owners see them: create, read, list, update, delete, fork, usage, event replay."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agentplane.chat.v1 import chat_pb2

from services.chat import parts as parts_mod
from services.chat.domain import NewMessage
from services.chat.store import queries
from services.chat.store.channels import INTERRUPT_CHANNEL, NOTIFY_PENDING, NOTIFY_WATCH, WATCH_CHANNEL
from services.chat.store.eventlog import N, Part, log_ctes, number, stored_event
from services.chat.store.rows import (
    CHAT_COLUMNS,
    USAGE_FIELDS,
    bad_token,
    chat_from_row,
    chat_not_found,
    decode_token,
    encode_token,
    message_event,
    now,
    status_event,
    usage_of,
)


@dataclass(frozen=True)
class WatchPosition:
    """Where a chat-list watch stands (what its cursor holds; see services/chat/watch.py).

    Every change whose transaction `snapshot` (``pg_snapshot`` text) sees was delivered, except,
    when `previous` is set, those `previous` does not see on chats whose id is above `after_id`.
    """

    snapshot: str
    previous: str | None = None
    after_id: str = ""


@dataclass(frozen=True)
class WatchChange:
    """One chat of a watch batch: its state now (None: deleted), and whether the change was owed
    from before the position's `snapshot` (`previous` did not see it) rather than new."""

    chat_id: str
    chat: chat_pb2.Chat | None
    owed_before: bool


@dataclass(frozen=True)
class WatchBatch:
    """The changes a watch has not delivered, read at `snapshot`."""

    snapshot: str
    changes: list[WatchChange]


@dataclass(frozen=True)
class RequestClaim:
    """What claiming a long request's idempotency key found: "mine" (do the work), "running"
    (another call is doing it) or "done" (its result is `message_id`), and for which chat."""

    state: Literal["mine", "running", "done"]
    chat_id: str
    message_id: str


# How long tombstones of deleted chats are kept for resumed watches: a day more than a watch
# cursor lives (services/chat/watch.py), so a cursor never needs a pruned one.
TOMBSTONE_SECONDS = 8 * 24 * 3600


class Chats(Part):
    """The chat operations of the API that are not about one message (see `Messages`)."""

    async def create_chat(
        self,
        *,
        owner_id: str,
        request_id: str,
        content: Sequence[chat_pb2.ContentPart],
        model_config_id: str,
        workspace_id: str,
        title: str,
    ) -> tuple[chat_pb2.Chat, chat_pb2.Message]:
        """Create a chat with its first user message, PENDING; a repeated request_id returns the first.

        One self-committing statement: the idempotency key, the chat row (which takes the
        change's seqs: it is new, so they are 1 and 2), the message, its two durable events and
        both notifications. When the key exists (even one committed by a concurrent duplicate an
        instant ago, which this statement's snapshot cannot see) nothing is inserted and the
        earlier chat is read.
        """
        chat_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
        when = now()
        msg = NewMessage(role="user", parts=content, sender_id=owner_id)
        events = [message_event(chat_id, message_id, msg, when), status_event("pending")]
        log, p = log_ctes(chat_id, events, when=when)
        p.update(id=chat_id, owner=owner_id, rid=request_id, m_id=message_id)
        p.update(title=title, model=model_config_id, ws=workspace_id)
        async with self._log.stmt() as cur:
            await cur.execute(
                "WITH r AS (INSERT INTO chat_requests (owner_id, kind, request_id, chat_id, message_id)"
                " SELECT %(owner)s, 'create', %(rid)s, %(id)s, %(m_id)s WHERE %(rid)s <> ''"
                " ON CONFLICT DO NOTHING RETURNING chat_id),"
                " c AS (INSERT INTO chat_chats (id, owner_id, title, status, model_config_id, workspace_id,"
                f" last_seq) SELECT %(id)s, %(owner)s, %(title)s, 'pending', %(model)s, %(ws)s, {N}"
                " WHERE %(rid)s = '' OR EXISTS (SELECT 1 FROM r)"
                f" RETURNING *, {NOTIFY_PENDING}, {NOTIFY_WATCH}){log}"
                " SELECT c.* FROM c",
                p,
            )
            row = await cur.fetchone()
        if row is None:
            return await self._earlier_create(owner_id, request_id)
        number(events, int(row["last_seq"]))
        message = chat_pb2.Message()
        message.CopyFrom(events[0].message_persisted)
        await self._log.publish(chat_id, events)
        return chat_from_row({**row, "queued_count": 0}), message

    async def _earlier_create(self, owner_id: str, request_id: str) -> tuple[chat_pb2.Chat, chat_pb2.Message]:
        """The chat and first message a repeated CreateChat request_id made the first time."""
        async with self._log.tx() as cur:
            await cur.execute(
                "SELECT chat_id, message_id FROM chat_requests"
                " WHERE owner_id = %s AND kind = 'create' AND request_id = %s",
                (owner_id, request_id),
            )
            earlier = await cur.fetchone()
            if earlier is None:  # cannot happen: the key existed when the insert skipped it
                raise RuntimeError(f"idempotency key {request_id!r} vanished")
            chat_id, message_id = str(earlier["chat_id"]), str(earlier["message_id"])
            return await queries.read_chat(cur, chat_id), await queries.read_message(cur, chat_id, message_id)

    async def get_chat(self, owner_id: str, chat_id: str) -> chat_pb2.Chat:
        """One of the owner's chats."""
        async with self._log.stmt() as cur:
            await cur.execute(
                f"SELECT {CHAT_COLUMNS} FROM chat_chats c WHERE c.id = %s AND c.owner_id = %s",
                (chat_id, owner_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise chat_not_found(chat_id)
        return chat_from_row(row)

    async def list_chats(
        self, owner_id: str, *, page_size: int, page_token: str, status: str | None, archived: bool
    ) -> tuple[list[chat_pb2.Chat], str]:
        """The owner's chats, newest activity first, keyset-paginated."""
        where = ["c.owner_id = %(owner)s", "c.archived = %(archived)s"]
        p: dict[str, Any] = {"owner": owner_id, "archived": archived, "limit": page_size + 1}
        if status:
            where.append("c.status = %(status)s")
            p["status"] = status
        if page_token:
            tok = decode_token("page_token", page_token)
            try:
                p["t_at"] = dt.datetime.fromisoformat(str(tok["u"]))
                p["t_id"] = str(uuid.UUID(str(tok["i"])))
            except (KeyError, ValueError):
                raise bad_token("page_token") from None
            where.append("(c.updated_at, c.id) < (%(t_at)s, %(t_id)s)")
        async with self._log.stmt() as cur:
            await cur.execute(
                f"SELECT {CHAT_COLUMNS} FROM chat_chats c WHERE {' AND '.join(where)}"
                " ORDER BY c.updated_at DESC, c.id DESC LIMIT %(limit)s",
                p,
            )
            rows = await cur.fetchall()
        token = ""
        if len(rows) > page_size:
            rows = rows[:page_size]
            last = rows[-1]
            token = encode_token({"u": last["updated_at"].isoformat(), "i": str(last["id"])})
        return [chat_from_row(r) for r in rows], token

    async def update_chat(
        self, owner_id: str, chat_id: str, *, title: str | None, archived: bool | None
    ) -> chat_pb2.Chat:
        """Change title and/or archived."""
        sets: list[str] = []
        p: dict[str, Any] = {}
        if title is not None:
            sets.append("title = %(title)s")
            p["title"] = title
        if archived is not None:
            sets.append("archived = %(archived)s")
            p["archived"] = archived
        async with self._log.tx() as cur:
            await queries.lock_chat(cur, owner_id, chat_id)
            await self._log.write(chat_id, [], set_sql=", ".join(sets), params=p, cur=cur)
            return await queries.read_chat(cur, chat_id)

    async def delete_chat(self, owner_id: str, chat_id: str) -> bool:
        """Delete a chat and everything in it; a worker running it loses its fence and stops.

        Idempotent: False (and nothing touched) when the owner has no such chat, because it is
        gone or was never theirs; the API answers both alike. One statement: the delete, the
        tombstone resumed watches report it from, the pruning of tombstones no cursor can still
        need, and both notifications.
        """
        async with self._log.stmt() as cur:
            await cur.execute(
                "WITH d AS (DELETE FROM chat_chats WHERE id = %(id)s AND owner_id = %(owner)s"
                f" RETURNING owner_id, id, pg_notify('{WATCH_CHANNEL}', owner_id || ' ' || id::text || ' d'),"
                f" pg_notify('{INTERRUPT_CHANNEL}', id::text)),"
                " t AS (INSERT INTO chat_watch_deletions (owner_id, chat_id) SELECT owner_id, id FROM d"
                " ON CONFLICT DO NOTHING),"
                " pruned AS (DELETE FROM chat_watch_deletions"
                " WHERE deleted_at < now() - make_interval(secs => %(keep)s) AND EXISTS (SELECT 1 FROM d))"
                " SELECT id FROM d",
                {"id": chat_id, "owner": owner_id, "keep": TOMBSTONE_SECONDS},
            )
            return await cur.fetchone() is not None

    async def fork_chat(
        self, *, owner_id: str, chat_id: str, message_id: str, request_id: str, title: str
    ) -> chat_pb2.Chat:
        """Copy the history up to `message_id` (all of it when empty) into a new WAITING chat."""
        new_chat = str(uuid.uuid4())
        async with self._log.tx() as cur:
            src = await queries.lock_chat(cur, owner_id, chat_id)
            earlier = await queries.record_request(cur, owner_id, "fork", request_id, new_chat, None)
            if earlier is not None:
                return await queries.read_chat(cur, str(earlier["chat_id"]))
            limit_seq = None
            if message_id:
                limit_seq = (await queries.live_message(cur, chat_id, message_id))["seq"]
            await cur.execute(
                "SELECT * FROM chat_messages WHERE chat_id = %s AND NOT deleted"
                " AND (%s::bigint IS NULL OR seq <= %s::bigint) ORDER BY seq",
                (chat_id, limit_seq, limit_seq),
            )
            rows = await cur.fetchall()
            await cur.execute(
                "INSERT INTO chat_chats (id, owner_id, title, status, model_config_id, workspace_id,"
                " parent_chat_id, agents_md) VALUES (%s, %s, %s, 'waiting', %s, %s, %s, %s)",
                (
                    new_chat,
                    owner_id,
                    title or f"Fork of {src['title']}"[:200],
                    src["model_config_id"],
                    src["workspace_id"],
                    chat_id,
                    src["agents_md"],
                ),
            )
            # The copies are the new chat's first change, stored through their events.
            events = [
                message_event(
                    new_chat,
                    str(uuid.uuid4()),
                    NewMessage(
                        role=r["role"],
                        parts=parts_mod.from_json(r["parts"]),
                        sender_id=r["sender_id"],
                        model_config_id=r["model_config_id"],
                        usage=usage_of(r),
                        runtime_ms=r["runtime_ms"],
                        visibility=r["visibility"],
                    ),
                    r["created_at"],
                )
                for r in rows
            ]
            events.append(status_event("waiting"))
            await self._log.write(new_chat, events, cur=cur)
            chat = await queries.read_chat(cur, new_chat)
        await self._log.publish(new_chat, events)
        return chat

    async def usage(
        self, user_id: str, start: dt.datetime | None, end: dt.datetime | None
    ) -> tuple[chat_pb2.Usage, list[chat_pb2.ModelUsage], int]:
        """Usage of a user's generations in [start, end)."""
        sums = ", ".join(f"coalesce(sum(m.{f}), 0) AS {f}" for f in USAGE_FIELDS)
        async with self._log.tx() as cur:
            await cur.execute(
                f"SELECT m.model_config_id, {sums}, count(*) AS generations"
                " FROM chat_messages m JOIN chat_chats c ON c.id = m.chat_id"
                " WHERE c.owner_id = %(u)s AND m.role IN ('assistant', 'summary')"
                " AND (%(s)s::timestamptz IS NULL OR m.created_at >= %(s)s)"
                " AND (%(e)s::timestamptz IS NULL OR m.created_at < %(e)s)"
                " GROUP BY ROLLUP (m.model_config_id)",
                {"u": user_id, "s": start, "e": end},
            )
            rows = await cur.fetchall()
            await cur.execute(
                "SELECT count(DISTINCT m.chat_id) AS n"
                " FROM chat_messages m JOIN chat_chats c ON c.id = m.chat_id"
                " WHERE c.owner_id = %(u)s"
                " AND (%(s)s::timestamptz IS NULL OR m.created_at >= %(s)s)"
                " AND (%(e)s::timestamptz IS NULL OR m.created_at < %(e)s)",
                {"u": user_id, "s": start, "e": end},
            )
            n = await cur.fetchone()
        total = chat_pb2.Usage()
        by_model = []
        for r in rows:
            if r["model_config_id"] is None:
                total = usage_of(r)
            else:
                by_model.append(
                    chat_pb2.ModelUsage(
                        model_config_id=r["model_config_id"],
                        usage=usage_of(r),
                        generations=int(r["generations"]),
                    )
                )
        return total, by_model, int(n["n"]) if n else 0

    async def events_between(
        self, chat_id: str, after_seq: int, before_seq: int | None = None
    ) -> list[chat_pb2.ChatEvent]:
        """Durable events with after_seq < seq (< before_seq), in order."""
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT seq, event FROM chat_events WHERE chat_id = %s AND seq > %s"
                " AND (%s::bigint IS NULL OR seq < %s::bigint) ORDER BY seq LIMIT 5000",
                (chat_id, after_seq, before_seq, before_seq),
            )
            rows = await cur.fetchall()
        return [stored_event(chat_id, int(r["seq"]), r["event"]) for r in rows]

    async def watch_snapshot(self) -> str:
        """The database's current snapshot (``pg_snapshot`` text): where a new watch starts."""
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.execute("SELECT pg_current_snapshot()::text AS snap")
            row = await cur.fetchone()
        assert row is not None
        return str(row["snap"])

    async def watch_changes(self, owner_id: str, since: WatchPosition) -> WatchBatch:
        """The owner's chats changed and deleted since `since`, read in one statement (one snapshot).

        A change is new when its transaction is not visible in ``since.snapshot``; with
        ``since.previous`` set, those not visible in that older snapshot whose chat id is above
        ``since.after_id`` are still owed too (see services/chat/watch.py).
        """
        owed = (
            "(NOT pg_visible_in_snapshot({xid}, %(s)s::pg_snapshot) OR (%(p)s::text IS NOT NULL"
            " AND NOT pg_visible_in_snapshot({xid}, %(p)s::pg_snapshot) AND {id} > %(a)s::uuid))"
        )
        p = {"o": owner_id, "s": since.snapshot, "p": since.previous, "a": since.after_id or None}
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT s.snap, s.deleted, c.*, pg_visible_in_snapshot(c.watch_xid, %(s)s::pg_snapshot)"
                " AS _owed_before"
                " FROM (SELECT pg_current_snapshot()::text AS snap, ARRAY(SELECT json_build_array(d.chat_id,"
                " pg_visible_in_snapshot(d.xid, %(s)s::pg_snapshot)) FROM chat_watch_deletions d"
                " WHERE d.owner_id = %(o)s AND "
                + owed.format(xid="d.xid", id="d.chat_id")
                + ") AS deleted) s"
                f" LEFT JOIN LATERAL (SELECT {CHAT_COLUMNS} FROM chat_chats c WHERE c.owner_id = %(o)s AND "
                + owed.format(xid="c.watch_xid", id="c.id")
                + ") c ON true",
                p,
            )
            rows = await cur.fetchall()
        changes = [WatchChange(str(d[0]), None, bool(d[1])) for d in rows[0]["deleted"]]
        changes += [
            WatchChange(str(r["id"]), chat_from_row(r), bool(r["_owed_before"])) for r in rows if r["id"]
        ]
        return WatchBatch(str(rows[0]["snap"]), changes)

    async def claim_request(
        self, owner_id: str, kind: str, request_id: str, chat_id: str, *, stale_seconds: float
    ) -> RequestClaim:
        """Claim the idempotency key of a long request (CompactChat) before doing its work.

        A new key is recorded as running (no message yet) and the caller does the work; so is a
        running key older than `stale_seconds` for the same chat, left by a replica that died
        (taken over). Otherwise the earlier claim is returned: done (its message) or running.
        """
        p = {"o": owner_id, "k": kind, "r": request_id, "c": chat_id, "stale": stale_seconds}
        async with self._log.stmt() as cur:
            await cur.execute(
                "INSERT INTO chat_requests (owner_id, kind, request_id, chat_id, message_id)"
                " VALUES (%(o)s, %(k)s, %(r)s, %(c)s, NULL)"
                " ON CONFLICT (owner_id, kind, request_id) DO UPDATE SET created_at = now()"
                " WHERE chat_requests.message_id IS NULL AND chat_requests.chat_id = EXCLUDED.chat_id"
                " AND chat_requests.created_at < now() - make_interval(secs => %(stale)s)"
                " RETURNING chat_id",
                p,
            )
            if await cur.fetchone() is not None:
                return RequestClaim("mine", chat_id, "")
            # A statement of its own: it sees the earlier key even when that committed after the
            # insert's snapshot was taken.
            await cur.execute(
                "SELECT chat_id, message_id FROM chat_requests"
                " WHERE owner_id = %(o)s AND kind = %(k)s AND request_id = %(r)s",
                p,
            )
            row = await cur.fetchone()
        if row is None:  # the earlier claim failed and was dropped in between: claim again
            return await self.claim_request(owner_id, kind, request_id, chat_id, stale_seconds=stale_seconds)
        if row["message_id"] is None:
            return RequestClaim("running", str(row["chat_id"]), "")
        return RequestClaim("done", str(row["chat_id"]), str(row["message_id"]))

    async def finish_request(self, owner_id: str, kind: str, request_id: str, message_id: str) -> None:
        """Record the result of a claimed request: repeats now return `message_id`."""
        async with self._log.stmt() as cur:
            await cur.execute(
                "UPDATE chat_requests SET message_id = %s"
                " WHERE owner_id = %s AND kind = %s AND request_id = %s AND message_id IS NULL",
                (message_id, owner_id, kind, request_id),
            )

    async def drop_request(self, owner_id: str, kind: str, request_id: str) -> None:
        """Forget a claimed request that failed: a repeat does the work again."""
        async with self._log.stmt() as cur:
            await cur.execute(
                "DELETE FROM chat_requests"
                " WHERE owner_id = %s AND kind = %s AND request_id = %s AND message_id IS NULL",
                (owner_id, kind, request_id),
            )

    async def get_message(self, owner_id: str, chat_id: str, message_id: str) -> chat_pb2.Message:
        """A message of one of the owner's chats, even one an edit has since removed."""
        async with self._log.stmt() as cur:
            await queries.check_owned(cur, owner_id, chat_id)
            return await queries.read_message(cur, chat_id, message_id)
