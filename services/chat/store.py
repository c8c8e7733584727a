"""Chat state in Postgres: one short transaction per state change.

Every change that clients should see allocates sequence numbers from ``chat_chats.last_seq``
in the same transaction (the row lock orders writers, so seq N+1 is never committed before
seq N), stores durable events in ``chat_events`` and is published to the event bus only
after the commit: no network call happens while a transaction is open.

Writes of a run are fenced by `Fence` (worker id and run generation); when the fence no
longer matches, `LeaseLost` is raised and nothing is written.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from agentplane.chat.v1 import chat_pb2
from google.protobuf import duration_pb2, timestamp_pb2
from psycopg import AsyncCursor
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.chat import parts as parts_mod
from services.chat.deltas import EventNumberer, Unnumbered
from services.chat.domain import Claim, Fence, LeaseLost, NewMessage, RenewResult, RunInfo
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

PENDING_CHANNEL = "agentplane_chat_pending"
INTERRUPT_CHANNEL = "agentplane_chat_interrupt"
WATCH_CHANNEL = "agentplane_chat_watch"
# Any canonical UUID's text has this length (36); used to split a serialized chat_id field.
_UUID_TEMPLATE = "00000000-0000-0000-0000-000000000000"
# Tells WatchChats subscribers that a chat changed, as a RETURNING item of the chat row's update.
_NOTIFY_WATCH = f"pg_notify('{WATCH_CHANNEL}', owner_id || ' ' || id::text || ' u') AS _n"

STATUS_TO_PB = {
    "pending": chat_pb2.CHAT_STATUS_PENDING,
    "running": chat_pb2.CHAT_STATUS_RUNNING,
    "waiting": chat_pb2.CHAT_STATUS_WAITING,
    "error": chat_pb2.CHAT_STATUS_ERROR,
}
PB_TO_STATUS = {v: k for k, v in STATUS_TO_PB.items()}
ROLE_TO_PB = {
    "user": chat_pb2.MESSAGE_ROLE_USER,
    "assistant": chat_pb2.MESSAGE_ROLE_ASSISTANT,
    "tool": chat_pb2.MESSAGE_ROLE_TOOL,
    "summary": chat_pb2.MESSAGE_ROLE_SUMMARY,
}
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_micros",
)
DURABLE_KINDS = frozenset(
    {"status_changed", "message_persisted", "queue_changed", "error", "history_truncated"}
)

CHAT_COLUMNS = """
    c.*, (SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = c.id) AS queued_count
"""


class _GeneralPath(Exception):
    """Raised inside a fast-path transaction to roll it back and take the general path."""


Publisher = Callable[[str, Sequence[chat_pb2.ChatEvent]], Awaitable[None]]


def now() -> dt.datetime:
    """The current UTC time."""
    return dt.datetime.now(dt.UTC)


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of `value`."""
    out = timestamp_pb2.Timestamp()
    if value is not None:
        out.FromDatetime(value)
    return out


def usage_of(row: dict[str, Any]) -> chat_pb2.Usage:
    """The Usage of a chats or messages row."""
    return chat_pb2.Usage(**{f: int(row[f]) for f in USAGE_FIELDS})


def chat_from_row(row: dict[str, Any]) -> chat_pb2.Chat:
    """A Chat proto from a chat_chats row (with queued_count)."""
    chat = chat_pb2.Chat(
        id=str(row["id"]),
        owner_id=row["owner_id"],
        title=row["title"],
        status=STATUS_TO_PB[row["status"]],
        model_config_id=row["model_config_id"],
        workspace_id=row["workspace_id"],
        archived=row["archived"],
        parent_chat_id=str(row["parent_chat_id"] or ""),
        queued_message_count=int(row.get("queued_count") or 0),
        last_seq=int(row["last_seq"]),
        usage=usage_of(row),
        create_time=ts(row["created_at"]),
        update_time=ts(row["updated_at"]),
    )
    if row["last_error_reason"]:
        chat.last_error.CopyFrom(
            chat_pb2.ChatError(
                reason=row["last_error_reason"],
                message=row["last_error_message"] or "",
                time=ts(row["last_error_time"]),
            )
        )
    return chat


def message_from_row(row: dict[str, Any]) -> chat_pb2.Message:
    """A Message proto from a chat_messages row."""
    return chat_pb2.Message(
        id=str(row["id"]),
        chat_id=str(row["chat_id"]),
        role=ROLE_TO_PB[row["role"]],
        parts=parts_mod.from_json(row["parts"]),
        visibility=int(row["visibility"]),  # type: ignore[arg-type]
        usage=usage_of(row),
        model_config_id=row["model_config_id"],
        runtime=duration_pb2.Duration(
            seconds=row["runtime_ms"] // 1000, nanos=(row["runtime_ms"] % 1000) * 10**6
        ),
        sender_id=row["sender_id"],
        seq=int(row["seq"]),
        create_time=ts(row["created_at"]),
    )


def _number(events: Sequence[chat_pb2.ChatEvent], first: int) -> chat_pb2.Message:
    """Give `events` (a user message's, then its status change) the seqs from `first` on;
    returns the message as persisted (with its seq)."""
    for i, ev in enumerate(events):
        ev.seq = first + i
    events[0].message_persisted.seq = first
    message = chat_pb2.Message()
    message.CopyFrom(events[0].message_persisted)
    return message


def queued_from_row(row: dict[str, Any], position: int) -> chat_pb2.QueuedMessage:
    """A QueuedMessage proto from a chat_queued_messages row."""
    return chat_pb2.QueuedMessage(
        id=str(row["id"]),
        chat_id=str(row["chat_id"]),
        position=position,
        parts=parts_mod.from_json(row["parts"]),
        sender_id=row["sender_id"],
        create_time=ts(row["created_at"]),
    )


def parse_uuid(field: str, value: str) -> str:
    """`value` as a canonical UUID string, or InvalidArgument naming `field`."""
    if not value:
        raise InvalidArgument(field, "is required")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(field, f"must be a UUID, got {value!r}") from None


def encode_token(data: dict[str, Any]) -> str:
    """An opaque page token."""
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def decode_token(field: str, token: str) -> dict[str, Any]:
    """The data of a page token, or InvalidArgument."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(data, dict):
            raise ValueError
        return data
    except ValueError:
        raise InvalidArgument(field, "is not a token returned by a previous call") from None


def chat_not_found(chat_id: str) -> NotFound:
    """The NOT_FOUND error for a chat the caller cannot see."""
    return NotFound(f"chat {chat_id} not found", reason="CHAT_NOT_FOUND", metadata={"chat_id": chat_id})


class ChatStore:
    """All SQL of the chat service."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        publish: Publisher,
        *,
        max_queued: int = 20,
        service_sender: str = "service:chat",
        numberer: EventNumberer | None = None,
    ) -> None:
        self._pool = pool
        self._publish = publish
        # Streaming events of all chats share batched seq statements (see services/chat/deltas.py).
        self._numberer = numberer
        self.max_queued = max_queued
        self.service_sender = service_sender

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncCursor[Any]]:
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    @asynccontextmanager
    async def _stmt(self) -> AsyncIterator[AsyncCursor[Any]]:
        """A cursor for one statement that commits by itself (no BEGIN/COMMIT round trips)."""
        async with self._pool.connection() as conn:
            if conn.autocommit:
                async with conn.cursor() as cur:
                    yield cur
            else:  # a pool without autocommit (some tests): same effect, one transaction
                async with conn.transaction(), conn.cursor() as cur:
                    yield cur

    async def _after_commit(self, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        if events:
            await self._publish(chat_id, events)

    # --- sequence numbers and events --------------------------------------------------

    async def _bump(
        self,
        cur: AsyncCursor[Any],
        chat_id: str,
        events: Sequence[chat_pb2.ChatEvent],
        *,
        fence: Fence | None = None,
        set_sql: str = "",
        params: dict[str, Any] | None = None,
        notify: bool = True,
        touch: bool = True,
    ) -> dict[str, Any]:
        """Allocate seqs for `events`, apply `set_sql` to the chat row, store durable events.

        Returns the row (its new last_seq); raises LeaseLost (fenced) or NotFound when no row matched.
        """
        sets, where, p = _chat_row_update(chat_id, len(events), fence, set_sql, "", params, touch)
        returning = f"last_seq, {_NOTIFY_WATCH}" if notify else "last_seq"
        await cur.execute(f"UPDATE chat_chats SET {sets} WHERE {where} RETURNING {returning}", p)
        row = await cur.fetchone()
        if row is None:
            if fence is not None:
                raise LeaseLost(chat_id)
            raise chat_not_found(chat_id)
        first = int(row["last_seq"]) - len(events) + 1
        stamp = ts(now())
        durable_seqs: list[int] = []
        durable_bytes: list[bytes] = []
        for i, ev in enumerate(events):
            ev.seq = first + i
            ev.chat_id = chat_id
            ev.time.CopyFrom(stamp)
            if ev.message_persisted.id:
                ev.message_persisted.seq = ev.seq
            if ev.WhichOneof("event") in DURABLE_KINDS:
                durable_seqs.append(ev.seq)
                durable_bytes.append(ev.SerializeToString())
        if durable_seqs:
            await cur.execute(
                "INSERT INTO chat_events (chat_id, seq, event)"
                " SELECT %s, unnest(%s::bigint[]), unnest(%s::bytea[])",
                (chat_id, durable_seqs, durable_bytes),
            )
        return dict(row)

    async def _write1(
        self,
        chat_id: str,
        events: Sequence[chat_pb2.ChatEvent],
        *,
        fence: Fence | None,
        set_sql: str = "",
        where_sql: str = "",
        params: dict[str, Any] | None = None,
        notify: bool = True,
        touch: bool = True,
        message: tuple[str, NewMessage, dt.datetime, int] | None = None,
        returning: str = "",
    ) -> dict[str, Any] | None:
        """One self-committing statement: allocate seqs, update the chat row, insert the message
        (it is `events[at]`) and the durable events; then number `events` for publishing.

        Durable events are stored without their seq (the row's `seq` column is the truth and
        readers put it back), so the whole change is one round trip. Returns the row, or None
        when no row matched (fence lost, chat gone or `where_sql` false).
        """
        n = len(events)
        sets, where, p = _chat_row_update(chat_id, n, fence, set_sql, where_sql, params, touch)
        ret = ", ".join(c for c in ("id, last_seq", returning, _NOTIFY_WATCH if notify else "") if c)
        stamp = ts(now())
        offsets: list[int] = []
        blobs: list[bytes] = []
        for i, ev in enumerate(events):
            ev.chat_id = chat_id
            ev.time.CopyFrom(stamp)
            if ev.WhichOneof("event") in DURABLE_KINDS:
                offsets.append(i)
                blobs.append(ev.SerializeToString())
        ctes = [f"c AS (UPDATE chat_chats SET {sets} WHERE {where} RETURNING {ret})"]
        if message is not None:
            message_id, msg, when, at = message
            p["m_at"] = at
            usage = msg.usage or chat_pb2.Usage()
            p.update(
                m_id=message_id,
                m_role=msg.role,
                m_parts=Jsonb(parts_mod.to_json(msg.parts)),
                m_vis=msg.visibility,
                m_model=msg.model_config_id,
                m_runtime=msg.runtime_ms,
                m_sender=msg.sender_id,
                m_when=when,
                **{f"m_{f}": getattr(usage, f) for f in USAGE_FIELDS},
            )
            ctes.append(
                "m AS (INSERT INTO chat_messages (id, chat_id, seq, role, parts, visibility, model_config_id,"
                " runtime_ms, sender_id, input_tokens, output_tokens, reasoning_tokens, cache_read_tokens,"
                " cache_write_tokens, cost_micros, created_at)"
                " SELECT %(m_id)s, c.id, c.last_seq - %(n)s + 1 + %(m_at)s, %(m_role)s, %(m_parts)s,"
                " %(m_vis)s,"
                " %(m_model)s, %(m_runtime)s, %(m_sender)s, %(m_input_tokens)s, %(m_output_tokens)s,"
                " %(m_reasoning_tokens)s, %(m_cache_read_tokens)s, %(m_cache_write_tokens)s,"
                " %(m_cost_micros)s, %(m_when)s FROM c)"
            )
        if offsets:
            p["e_off"], p["e_ev"] = offsets, blobs
            ctes.append(
                "e AS (INSERT INTO chat_events (chat_id, seq, event)"
                " SELECT c.id, c.last_seq - %(n)s + 1 + d.i, d.ev"
                " FROM c, unnest(%(e_off)s::int[], %(e_ev)s::bytea[]) AS d(i, ev))"
            )
        async with self._stmt() as cur:
            await cur.execute(f"WITH {', '.join(ctes)} SELECT * FROM c", p)
            row = await cur.fetchone()
        if row is None:
            return None
        first = int(row["last_seq"]) - n + 1
        for i, ev in enumerate(events):
            ev.seq = first + i
            if ev.message_persisted.id:
                ev.message_persisted.seq = ev.seq
        return dict(row)

    async def _insert_message(
        self,
        cur: AsyncCursor[Any],
        chat_id: str,
        message_id: str,
        msg: NewMessage,
        seq: int,
        when: dt.datetime,
    ) -> None:
        usage = msg.usage or chat_pb2.Usage()
        await cur.execute(
            "INSERT INTO chat_messages (id, chat_id, seq, role, parts, visibility, model_config_id,"
            " runtime_ms, sender_id, input_tokens, output_tokens, reasoning_tokens, cache_read_tokens,"
            " cache_write_tokens, cost_micros, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                message_id,
                chat_id,
                seq,
                msg.role,
                Jsonb(parts_mod.to_json(msg.parts)),
                msg.visibility,
                msg.model_config_id,
                msg.runtime_ms,
                msg.sender_id,
                usage.input_tokens,
                usage.output_tokens,
                usage.reasoning_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
                usage.cost_micros,
                when,
            ),
        )

    def _message_event(
        self, chat_id: str, message_id: str, msg: NewMessage, when: dt.datetime
    ) -> chat_pb2.ChatEvent:
        usage = msg.usage or chat_pb2.Usage()
        pb = chat_pb2.Message(
            id=message_id,
            chat_id=chat_id,
            role=ROLE_TO_PB[msg.role],
            parts=list(msg.parts),
            visibility=msg.visibility,  # type: ignore[arg-type]
            usage=usage,
            model_config_id=msg.model_config_id,
            runtime=duration_pb2.Duration(
                seconds=msg.runtime_ms // 1000, nanos=(msg.runtime_ms % 1000) * 10**6
            ),
            sender_id=msg.sender_id,
            create_time=ts(when),
        )
        return chat_pb2.ChatEvent(message_persisted=pb)

    async def _queue_event(self, cur: AsyncCursor[Any], chat_id: str) -> chat_pb2.ChatEvent:
        queued = await self._queued(cur, chat_id)
        return chat_pb2.ChatEvent(queue_changed=chat_pb2.QueueChanged(queued_messages=queued))

    async def _queued(
        self, cur: AsyncCursor[Any], chat_id: str, limit: int = 100
    ) -> list[chat_pb2.QueuedMessage]:
        await cur.execute(
            "SELECT * FROM chat_queued_messages WHERE chat_id = %s ORDER BY position LIMIT %s",
            (chat_id, limit),
        )
        return [queued_from_row(r, i + 1) for i, r in enumerate(await cur.fetchall())]

    @staticmethod
    def _status_event(status: str, reason: str = "", message: str = "") -> chat_pb2.ChatEvent:
        ev = chat_pb2.ChatEvent(status_changed=chat_pb2.StatusChanged(status=STATUS_TO_PB[status]))
        if reason:
            ev.status_changed.error.CopyFrom(
                chat_pb2.ChatError(reason=reason, message=message, time=ts(now()))
            )
        return ev

    async def _lock_chat(self, cur: AsyncCursor[Any], owner_id: str, chat_id: str) -> dict[str, Any]:
        await cur.execute(
            "SELECT * FROM chat_chats WHERE id = %s AND owner_id = %s FOR UPDATE", (chat_id, owner_id)
        )
        row = await cur.fetchone()
        if row is None:
            raise chat_not_found(chat_id)
        return dict(row)

    async def _chat(self, cur: AsyncCursor[Any], chat_id: str) -> chat_pb2.Chat:
        await cur.execute(f"SELECT {CHAT_COLUMNS} FROM chat_chats c WHERE c.id = %s", (chat_id,))
        row = await cur.fetchone()
        if row is None:
            raise chat_not_found(chat_id)
        return chat_from_row(row)

    async def _claim_request(
        self,
        cur: AsyncCursor[Any],
        owner_id: str,
        kind: str,
        request_id: str,
        chat_id: str,
        message_id: str | None,
    ) -> dict[str, Any] | None:
        """Record an idempotency key; returns the earlier record when the key was used before."""
        if not request_id:
            return None
        await cur.execute(
            "INSERT INTO chat_requests (owner_id, kind, request_id, chat_id, message_id)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING chat_id",
            (owner_id, kind, request_id, chat_id, message_id),
        )
        if await cur.fetchone() is not None:
            return None
        await cur.execute(
            "SELECT * FROM chat_requests WHERE owner_id = %s AND kind = %s AND request_id = %s",
            (owner_id, kind, request_id),
        )
        return await cur.fetchone()

    # --- chats --------------------------------------------------------------------------

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

        One self-committing statement: the idempotency key, the chat row, the message, its two
        durable events and both notifications. A chat is new, so its seqs are known (1 and 2).
        When the key exists (even one committed by a concurrent duplicate an instant ago, which
        this statement's snapshot cannot see) nothing is inserted and the earlier chat is read.
        """
        chat_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
        when = now()
        events, p = self._pending_user_message(chat_id, message_id, owner_id, request_id, content, when)
        p.update(title=title, model=model_config_id, ws=workspace_id)
        async with self._stmt() as cur:
            await cur.execute(
                "WITH r AS (INSERT INTO chat_requests (owner_id, kind, request_id, chat_id, message_id)"
                " SELECT %(owner)s, 'create', %(rid)s, %(id)s, %(m_id)s WHERE %(rid)s <> ''"
                " ON CONFLICT DO NOTHING RETURNING chat_id),"
                " c AS (INSERT INTO chat_chats (id, owner_id, title, status, model_config_id, workspace_id,"
                " last_seq) SELECT %(id)s, %(owner)s, %(title)s, 'pending', %(model)s, %(ws)s, 2"
                " WHERE %(rid)s = '' OR EXISTS (SELECT 1 FROM r)"
                f" RETURNING *, pg_notify('{PENDING_CHANNEL}', id::text) AS _p, {_NOTIFY_WATCH}),"
                " m AS (INSERT INTO chat_messages (id, chat_id, seq, role, parts, visibility, sender_id,"
                " created_at) SELECT %(m_id)s, c.id, 1, 'user', %(m_parts)s, %(m_vis)s, c.owner_id, %(when)s"
                " FROM c),"
                " e AS (INSERT INTO chat_events (chat_id, seq, event)"
                " SELECT c.id, d.seq, d.ev FROM c, unnest(%(e_ev)s::bytea[]) WITH ORDINALITY AS d(ev, seq))"
                " SELECT c.* FROM c",
                p,
            )
            row = await cur.fetchone()
        if row is None:
            return await self._earlier_create(owner_id, request_id)
        message = _number(events, 1)
        await self._after_commit(chat_id, events)
        return chat_from_row({**row, "queued_count": 0}), message

    async def _earlier_create(self, owner_id: str, request_id: str) -> tuple[chat_pb2.Chat, chat_pb2.Message]:
        """The chat and first message a repeated CreateChat request_id made the first time."""
        async with self._tx() as cur:
            await cur.execute(
                "SELECT chat_id, message_id FROM chat_requests"
                " WHERE owner_id = %s AND kind = 'create' AND request_id = %s",
                (owner_id, request_id),
            )
            earlier = await cur.fetchone()
            if earlier is None:  # cannot happen: the key existed when the insert skipped it
                raise RuntimeError(f"idempotency key {request_id!r} vanished")
            chat_id, message_id = str(earlier["chat_id"]), str(earlier["message_id"])
            return await self._chat(cur, chat_id), await self._message(cur, chat_id, message_id)

    async def _message(self, cur: AsyncCursor[Any], chat_id: str, message_id: str) -> chat_pb2.Message:
        await cur.execute("SELECT * FROM chat_messages WHERE id = %s AND chat_id = %s", (message_id, chat_id))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"message {message_id} not found in chat {chat_id}",
                reason="MESSAGE_NOT_FOUND",
                metadata={"message_id": message_id},
            )
        return message_from_row(row)

    async def get_chat(self, owner_id: str, chat_id: str) -> chat_pb2.Chat:
        """One of the owner's chats."""
        async with self._stmt() as cur:
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
                raise InvalidArgument("page_token", "is not a token returned by a previous call") from None
            where.append("(c.updated_at, c.id) < (%(t_at)s, %(t_id)s)")
        async with self._stmt() as cur:
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
        async with self._tx() as cur:
            await self._lock_chat(cur, owner_id, chat_id)
            await self._bump(cur, chat_id, [], set_sql=", ".join(sets), params=p)
            chat = await self._chat(cur, chat_id)
        return chat

    async def delete_chat(self, owner_id: str, chat_id: str) -> None:
        """Delete a chat and everything in it; a worker running it loses its fence and stops."""
        async with self._tx() as cur:
            await cur.execute(
                "DELETE FROM chat_chats WHERE id = %s AND owner_id = %s"
                f" RETURNING pg_notify('{WATCH_CHANNEL}', owner_id || ' ' || id::text || ' d'),"
                f" pg_notify('{INTERRUPT_CHANNEL}', id::text)",
                (chat_id, owner_id),
            )
            if await cur.fetchone() is None:
                raise chat_not_found(chat_id)

    # --- messages -------------------------------------------------------------------------

    async def send_message(
        self,
        *,
        owner_id: str,
        chat_id: str,
        request_id: str,
        content: Sequence[chat_pb2.ContentPart],
        interrupt: bool,
    ) -> tuple[chat_pb2.Chat, chat_pb2.Message | None, chat_pb2.QueuedMessage | None]:
        """Add a user message: into the history when idle, else queued (or queued first + interrupt)."""
        new_id = str(uuid.uuid4())
        when = now()
        sent = await self._send_when_idle(owner_id, chat_id, request_id, content, new_id, when)
        if sent is not None:
            return sent
        events: list[chat_pb2.ChatEvent] = []
        async with self._tx() as cur:
            row = await self._lock_chat(cur, owner_id, chat_id)
            earlier = await self._claim_request(cur, owner_id, "send", request_id, chat_id, new_id)
            if earlier is not None:
                if str(earlier["chat_id"]) != chat_id:
                    raise InvalidArgument("request_id", "was already used for a message to another chat")
                return await self._earlier_send(cur, chat_id, str(earlier["message_id"]))
            idle = row["worker_id"] is None and row["status"] in ("waiting", "error")
            finishing = row["worker_id"] is not None and row["status"] == "waiting"
            if idle:
                msg = NewMessage(role="user", parts=content, sender_id=owner_id)
                events = [self._message_event(chat_id, new_id, msg, when), self._status_event("pending")]
                await self._bump(
                    cur,
                    chat_id,
                    events,
                    set_sql="status = 'pending', last_error_reason = NULL, last_error_message = NULL,"
                    " last_error_time = NULL",
                )
                await self._insert_message(cur, chat_id, new_id, msg, events[0].seq, when)
                await cur.execute("SELECT pg_notify(%s, %s)", (PENDING_CHANNEL, chat_id))
                chat = await self._chat(cur, chat_id)
                message = await self._message(cur, chat_id, new_id)
                result: tuple[Any, Any, Any] = (chat, message, None)
            else:
                front = interrupt or finishing
                await cur.execute(
                    "SELECT count(*) AS n, min(position) AS lo, max(position) AS hi FROM chat_queued_messages"
                    " WHERE chat_id = %s",
                    (chat_id,),
                )
                q = await cur.fetchone()
                assert q is not None
                if q["n"] >= self.max_queued:
                    raise ResourceExhausted(
                        f"chat {chat_id} already has {self.max_queued} queued messages; wait for the current"
                        " turn or delete queued messages",
                        reason="QUEUE_FULL",
                        metadata={"chat_id": chat_id},
                    )
                position = (q["lo"] - 1 if front else q["hi"] + 1) if q["n"] else 0
                await cur.execute(
                    "INSERT INTO chat_queued_messages (id, chat_id, position, parts, sender_id, created_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (new_id, chat_id, position, Jsonb(parts_mod.to_json(content)), owner_id, when),
                )
                wake = row["worker_id"] is not None and (interrupt or finishing)
                events = [await self._queue_event(cur, chat_id)]
                await self._bump(
                    cur,
                    chat_id,
                    events,
                    set_sql="interrupt = 'resume'" if wake else "",
                )
                if wake:
                    await cur.execute("SELECT pg_notify(%s, %s)", (INTERRUPT_CHANNEL, chat_id))
                chat = await self._chat(cur, chat_id)
                queued = next(m for m in events[0].queue_changed.queued_messages if m.id == new_id)
                result = (chat, None, queued)
        await self._after_commit(chat_id, events)
        return result

    async def _send_when_idle(
        self,
        owner_id: str,
        chat_id: str,
        request_id: str,
        content: Sequence[chat_pb2.ContentPart],
        new_id: str,
        when: dt.datetime,
    ) -> tuple[chat_pb2.Chat, chat_pb2.Message, None] | None:
        """The common case of `send_message` (an idle chat, a new request id) in one statement.

        The chat row's update matches only an idle chat of the owner whose request id is new; the
        idempotency key, the message and its two durable events (stored without seqs: the column
        is the truth) hang off its RETURNING. It runs inside a transaction so that the one race
        this snapshot cannot see (a concurrent duplicate committing its key first) rolls back
        instead of storing the message twice. None: not the common case; take the general path.
        """
        events, p = self._pending_user_message(chat_id, new_id, owner_id, request_id, content, when)
        try:
            async with self._tx() as cur:
                await cur.execute(
                    "WITH u AS (UPDATE chat_chats SET last_seq = last_seq + 2, updated_at = now(),"
                    " status = 'pending', last_error_reason = NULL, last_error_message = NULL,"
                    " last_error_time = NULL"
                    " WHERE id = %(id)s AND owner_id = %(owner)s AND worker_id IS NULL"
                    " AND status IN ('waiting', 'error') AND NOT EXISTS (SELECT 1 FROM chat_requests"
                    " WHERE owner_id = %(owner)s AND kind = 'send' AND request_id = %(rid)s)"
                    f" RETURNING *, pg_notify('{PENDING_CHANNEL}', id::text) AS _p, {_NOTIFY_WATCH}),"
                    " r AS (INSERT INTO chat_requests (owner_id, kind, request_id, chat_id, message_id)"
                    " SELECT %(owner)s, 'send', %(rid)s, u.id, %(m_id)s FROM u WHERE %(rid)s <> ''"
                    " ON CONFLICT DO NOTHING RETURNING chat_id),"
                    " m AS (INSERT INTO chat_messages (id, chat_id, seq, role, parts, visibility, sender_id,"
                    " created_at) SELECT %(m_id)s, u.id, u.last_seq - 1, 'user', %(m_parts)s, %(m_vis)s,"
                    " %(owner)s, %(when)s FROM u),"
                    " e AS (INSERT INTO chat_events (chat_id, seq, event)"
                    " SELECT u.id, u.last_seq - 2 + d.i, d.ev FROM u,"
                    " unnest(%(e_ev)s::bytea[]) WITH ORDINALITY AS d(ev, i))"
                    " SELECT u.*, (SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = u.id)"
                    " AS queued_count, %(rid)s = '' OR EXISTS (SELECT 1 FROM r) AS _recorded FROM u",
                    p,
                )
                row = await cur.fetchone()
                if row is None or not row["_recorded"]:
                    raise _GeneralPath
        except _GeneralPath:
            return None
        message = _number(events, int(row["last_seq"]) - 1)
        await self._after_commit(chat_id, events)
        return chat_from_row(row), message, None

    def _pending_user_message(
        self,
        chat_id: str,
        message_id: str,
        owner_id: str,
        request_id: str,
        content: Sequence[chat_pb2.ContentPart],
        when: dt.datetime,
    ) -> tuple[list[chat_pb2.ChatEvent], dict[str, Any]]:
        """A user message that makes its chat pending, for the single statements that store one.

        Returns its two durable events (stamped, not numbered yet: they are stored without seqs,
        the column is the truth; `_number` numbers them once the statement returned) and the
        statement parameters for the chat, the idempotency key, the message and the events.
        """
        msg = NewMessage(role="user", parts=content, sender_id=owner_id)
        events = [self._message_event(chat_id, message_id, msg, when), self._status_event("pending")]
        stamp = ts(when)
        for ev in events:
            ev.chat_id = chat_id
            ev.time.CopyFrom(stamp)
        params: dict[str, Any] = {
            "id": chat_id,
            "owner": owner_id,
            "rid": request_id,
            "m_id": message_id,
            "m_parts": Jsonb(parts_mod.to_json(content)),
            "m_vis": msg.visibility,
            "when": when,
            "e_ev": [ev.SerializeToString() for ev in events],
        }
        return events, params

    async def _earlier_send(
        self, cur: AsyncCursor[Any], chat_id: str, message_id: str
    ) -> tuple[chat_pb2.Chat, chat_pb2.Message | None, chat_pb2.QueuedMessage | None]:
        chat = await self._chat(cur, chat_id)
        await cur.execute("SELECT * FROM chat_messages WHERE id = %s", (message_id,))
        row = await cur.fetchone()
        if row is not None:
            return chat, message_from_row(row), None
        for q in await self._queued(cur, chat_id):
            if q.id == message_id:
                return chat, None, q
        # The queued message was deleted by the user: the request happened; nothing to return.
        return chat, None, None

    async def _live_message(self, cur: Any, chat_id: str, message_id: str) -> dict[str, Any]:
        """The row of a message of the chat that no edit has deleted, or NotFound."""
        await cur.execute(
            "SELECT * FROM chat_messages WHERE id = %s AND chat_id = %s AND NOT deleted",
            (message_id, chat_id),
        )
        row: dict[str, Any] | None = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"message {message_id} not found in chat {chat_id}",
                reason="MESSAGE_NOT_FOUND",
                metadata={"message_id": message_id},
            )
        return row

    async def edit_message(
        self, *, owner_id: str, chat_id: str, message_id: str, content: Sequence[chat_pb2.ContentPart]
    ) -> tuple[chat_pb2.Chat, chat_pb2.Message]:
        """Replace a user message: soft-delete it and everything after, add the new one, run again."""
        new_id = str(uuid.uuid4())
        when = now()
        async with self._tx() as cur:
            await self._lock_chat(cur, owner_id, chat_id)
            old = await self._live_message(cur, chat_id, message_id)
            if old["role"] != "user":
                raise FailedPrecondition(
                    f"message {message_id} is a {old['role']} message; only user messages can be edited",
                    reason="NOT_A_USER_MESSAGE",
                )
            await cur.execute(
                "UPDATE chat_messages SET deleted = true WHERE chat_id = %s AND seq >= %s AND NOT deleted",
                (chat_id, old["seq"]),
            )
            await cur.execute(
                "SELECT * FROM chat_messages WHERE chat_id = %s AND seq < %s AND NOT deleted"
                " ORDER BY seq DESC LIMIT 1",
                (chat_id, old["seq"]),
            )
            prev = await cur.fetchone()
            kept = message_from_row(prev) if prev else chat_pb2.Message(chat_id=chat_id)
            msg = NewMessage(role="user", parts=content, sender_id=owner_id)
            events = [
                chat_pb2.ChatEvent(history_truncated=kept),
                self._message_event(chat_id, new_id, msg, when),
                self._status_event("pending"),
            ]
            # A new generation takes the chat away from any worker running it: its writes now fail.
            await self._bump(
                cur,
                chat_id,
                events,
                set_sql="status = 'pending', worker_id = NULL, lease_expires_at = NULL,"
                " generation = generation + 1, interrupt = NULL, last_error_reason = NULL,"
                " last_error_message = NULL, last_error_time = NULL",
            )
            await self._insert_message(cur, chat_id, new_id, msg, events[1].seq, when)
            await cur.execute(
                "SELECT pg_notify(%s, %s), pg_notify(%s, %s)",
                (PENDING_CHANNEL, chat_id, INTERRUPT_CHANNEL, chat_id),
            )
            chat = await self._chat(cur, chat_id)
            message = await self._message(cur, chat_id, new_id)
        await self._after_commit(chat_id, events)
        return chat, message

    async def list_messages(
        self, owner_id: str, chat_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[chat_pb2.Message], str]:
        """Visible messages, oldest first."""
        after = 0
        if page_token:
            tok = decode_token("page_token", page_token)
            try:
                after = int(tok["s"])
            except (KeyError, ValueError, TypeError):
                raise InvalidArgument("page_token", "is not a token returned by a previous call") from None
        async with self._stmt() as cur:  # reads: no transaction needed
            await self._owned(cur, owner_id, chat_id)
            await cur.execute(
                "SELECT * FROM chat_messages WHERE chat_id = %s AND NOT deleted AND seq > %s"
                f" AND visibility <> {chat_pb2.VISIBILITY_MODEL} ORDER BY seq LIMIT %s",
                (chat_id, after, page_size + 1),
            )
            rows = await cur.fetchall()
        token = ""
        if len(rows) > page_size:
            rows = rows[:page_size]
            token = encode_token({"s": int(rows[-1]["seq"])})
        return [message_from_row(r) for r in rows], token

    async def _owned(self, cur: AsyncCursor[Any], owner_id: str, chat_id: str) -> None:
        await cur.execute("SELECT 1 FROM chat_chats WHERE id = %s AND owner_id = %s", (chat_id, owner_id))
        if await cur.fetchone() is None:
            raise chat_not_found(chat_id)

    # --- queue -----------------------------------------------------------------------------

    async def list_queued(
        self, owner_id: str, chat_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[chat_pb2.QueuedMessage], str]:
        """Queued messages, next first."""
        offset = 0
        if page_token:
            try:
                offset = int(decode_token("page_token", page_token)["o"])
            except (KeyError, ValueError, TypeError):
                raise InvalidArgument("page_token", "is not a token returned by a previous call") from None
        async with self._tx() as cur:
            await self._owned(cur, owner_id, chat_id)
            queued = await self._queued(cur, chat_id)
        page = queued[offset : offset + page_size]
        token = encode_token({"o": offset + page_size}) if offset + page_size < len(queued) else ""
        return page, token

    async def delete_queued(self, owner_id: str, chat_id: str, queued_id: str) -> None:
        """Remove a queued message."""
        async with self._tx() as cur:
            await self._lock_chat(cur, owner_id, chat_id)
            await cur.execute(
                "DELETE FROM chat_queued_messages WHERE id = %s AND chat_id = %s RETURNING id",
                (queued_id, chat_id),
            )
            if await cur.fetchone() is None:
                raise self._queued_not_found(chat_id, queued_id)
            events = [await self._queue_event(cur, chat_id)]
            await self._bump(cur, chat_id, events)
        await self._after_commit(chat_id, events)

    @staticmethod
    def _queued_not_found(chat_id: str, queued_id: str) -> NotFound:
        return NotFound(
            f"queued message {queued_id} not found in chat {chat_id}",
            reason="QUEUED_MESSAGE_NOT_FOUND",
            metadata={"queued_message_id": queued_id},
        )

    async def promote_queued(
        self, owner_id: str, chat_id: str, queued_id: str
    ) -> list[chat_pb2.QueuedMessage]:
        """Move a queued message to the front."""
        async with self._tx() as cur:
            await self._lock_chat(cur, owner_id, chat_id)
            await cur.execute(
                "UPDATE chat_queued_messages SET position ="
                " (SELECT min(position) - 1 FROM chat_queued_messages WHERE chat_id = %s)"
                " WHERE id = %s AND chat_id = %s RETURNING id",
                (chat_id, queued_id, chat_id),
            )
            if await cur.fetchone() is None:
                raise self._queued_not_found(chat_id, queued_id)
            events = [await self._queue_event(cur, chat_id)]
            await self._bump(cur, chat_id, events)
        await self._after_commit(chat_id, events)
        return list(events[0].queue_changed.queued_messages)

    # --- interrupt, fork, usage ------------------------------------------------------------

    async def interrupt(self, owner_id: str, chat_id: str) -> chat_pb2.Chat:
        """Stop the current turn: the chat waits; a running worker is told to wrap up."""
        events: list[chat_pb2.ChatEvent] = []
        async with self._tx() as cur:
            row = await self._lock_chat(cur, owner_id, chat_id)
            if row["status"] in ("running", "pending"):
                events = [self._status_event("waiting")]
                if row["worker_id"] is not None:
                    # The worker keeps its fence to persist partial output, then releases the chat.
                    await self._bump(cur, chat_id, events, set_sql="status = 'waiting', interrupt = 'stop'")
                    await cur.execute("SELECT pg_notify(%s, %s)", (INTERRUPT_CHANNEL, chat_id))
                else:
                    await self._bump(cur, chat_id, events, set_sql="status = 'waiting'")
            chat = await self._chat(cur, chat_id)
        await self._after_commit(chat_id, events)
        return chat

    async def fork_chat(
        self, *, owner_id: str, chat_id: str, message_id: str, request_id: str, title: str
    ) -> chat_pb2.Chat:
        """Copy the history up to `message_id` (all of it when empty) into a new WAITING chat."""
        new_chat = str(uuid.uuid4())
        events: list[chat_pb2.ChatEvent] = []
        async with self._tx() as cur:
            src = await self._lock_chat(cur, owner_id, chat_id)
            earlier = await self._claim_request(cur, owner_id, "fork", request_id, new_chat, None)
            if earlier is not None:
                return await self._chat(cur, str(earlier["chat_id"]))
            limit_seq = None
            if message_id:
                limit_seq = (await self._live_message(cur, chat_id, message_id))["seq"]
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
            copies: list[tuple[str, NewMessage, dt.datetime]] = []
            for r in rows:
                usage = usage_of(r)
                copies.append(
                    (
                        str(uuid.uuid4()),
                        NewMessage(
                            role=r["role"],
                            parts=parts_mod.from_json(r["parts"]),
                            sender_id=r["sender_id"],
                            model_config_id=r["model_config_id"],
                            usage=usage,
                            runtime_ms=r["runtime_ms"],
                            visibility=r["visibility"],
                        ),
                        r["created_at"],
                    )
                )
            events = [self._message_event(new_chat, mid, m, when) for mid, m, when in copies]
            events.append(self._status_event("waiting"))
            await self._bump(cur, new_chat, events)
            for (mid, m, when), ev in zip(copies, events, strict=False):
                await self._insert_message(cur, new_chat, mid, m, ev.seq, when)
            chat = await self._chat(cur, new_chat)
        await self._after_commit(new_chat, events)
        return chat

    async def usage(
        self, user_id: str, start: dt.datetime | None, end: dt.datetime | None
    ) -> tuple[chat_pb2.Usage, list[chat_pb2.ModelUsage], int]:
        """Usage of a user's generations in [start, end)."""
        sums = ", ".join(f"coalesce(sum(m.{f}), 0) AS {f}" for f in USAGE_FIELDS)
        async with self._tx() as cur:
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

    # --- events ----------------------------------------------------------------------------

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
        out = []
        for r in rows:
            # Single-statement writes store events without their seq: the column is the truth.
            ev = chat_pb2.ChatEvent.FromString(r["event"])
            ev.seq = int(r["seq"])
            if ev.message_persisted.id:
                ev.message_persisted.seq = ev.seq
            out.append(ev)
        return out

    async def chat_for_watch(self, chat_id: str) -> chat_pb2.Chat | None:
        """A chat by id (no owner check: the watcher filters by owner), or None."""
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(f"SELECT {CHAT_COLUMNS} FROM chat_chats c WHERE c.id = %s", (chat_id,))
            row = await cur.fetchone()
        return chat_from_row(row) if row else None

    # --- workers -----------------------------------------------------------------------------

    async def claim(self, worker_id: str, limit: int, lease_seconds: float) -> list[Claim]:
        """Acquire up to `limit` pending chats, oldest first, skipping rows others are locking.

        The same statement starts each run (RUNNING event, interrupt flag cleared) and returns
        what the run needs, so a claimed chat costs no `start_run` round trip. Chats whose
        interrupt asked to resume with a queued message are only claimed: their run calls
        `start_run`, which delivers that message.
        """
        if limit <= 0:
            return []
        running = self._status_event("running")
        running.time.CopyFrom(ts(now()))
        # Serialized protobuf messages concatenate as a merge, so the event stored for each chat
        # is this prefix plus the chat_id field, whose bytes SQL appends (the seq column is the
        # seq's truth, as for every single-statement write).
        id_field = chat_pb2.ChatEvent(chat_id=_UUID_TEMPLATE).SerializeToString()[: -len(_UUID_TEMPLATE)]
        async with self._stmt() as cur:
            await cur.execute(
                "WITH c AS (UPDATE chat_chats SET status = 'running', worker_id = %(w)s,"
                " generation = generation + 1, lease_expires_at = now() + make_interval(secs => %(l)s),"
                " last_seq = last_seq + CASE WHEN interrupt = 'resume' THEN 0 ELSE 1 END,"
                " interrupt = CASE WHEN interrupt = 'resume' THEN 'resume' END, updated_at = now()"
                " WHERE id IN (SELECT id FROM chat_chats WHERE status = 'pending' ORDER BY updated_at"
                " FOR UPDATE SKIP LOCKED LIMIT %(n)s)"
                " RETURNING id, generation, last_seq, interrupt, owner_id, model_config_id, workspace_id,"
                f" agents_md, {_NOTIFY_WATCH}),"
                " e AS (INSERT INTO chat_events (chat_id, seq, event)"
                " SELECT c.id, c.last_seq, %(ev)s || convert_to(c.id::text, 'UTF8') FROM c"
                " WHERE c.interrupt IS NULL)"
                " SELECT * FROM c",
                {
                    "w": worker_id,
                    "l": lease_seconds,
                    "n": limit,
                    "ev": running.SerializeToString() + id_field,
                },
            )
            rows = await cur.fetchall()
        claims = []
        for r in rows:
            chat_id = str(r["id"])
            info = None
            if r["interrupt"] is None:
                info = RunInfo(
                    chat_id, r["owner_id"], r["model_config_id"], r["workspace_id"], r["agents_md"]
                )
            claims.append(Claim(chat_id, Fence(worker_id, int(r["generation"])), info))
        for r, claim in zip(rows, claims, strict=True):
            if claim.info is not None:
                ev = chat_pb2.ChatEvent()
                ev.CopyFrom(running)
                ev.chat_id, ev.seq = claim.chat_id, int(r["last_seq"])
                await self._after_commit(claim.chat_id, [ev])
        return claims

    async def renew(self, worker_id: str, lease_seconds: float) -> RenewResult:
        """Renew every lease of `worker_id` in one statement; report what it still holds."""
        async with self._stmt() as cur:
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
        async with self._tx() as cur:
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

    async def start_run(
        self, chat_id: str, fence: Fence, *, committed: Callable[[], None] | None = None
    ) -> RunInfo:
        """Announce RUNNING; deliver the front queued message when an interrupt asked to resume.

        `committed` is called right after the commit, before anything is published: from then on
        the chat's interrupt flag is clear, so the caller can start honouring new interrupts.
        """
        # Common case (no interrupt asking to resume): one statement.
        events: list[chat_pb2.ChatEvent] = [self._status_event("running")]
        fast = await self._write1(
            chat_id,
            events,
            fence=fence,
            set_sql="interrupt = NULL",
            where_sql="interrupt IS DISTINCT FROM 'resume'",
            returning="owner_id, model_config_id, workspace_id, agents_md",
        )
        if fast is not None:
            if committed is not None:
                committed()
            await self._after_commit(chat_id, events)
            return RunInfo(
                chat_id=chat_id,
                owner_id=fast["owner_id"],
                model_config_id=fast["model_config_id"],
                workspace_id=fast["workspace_id"],
                agents_md=fast["agents_md"],
            )
        events = []
        async with self._tx() as cur:
            await cur.execute(
                "SELECT * FROM chat_chats WHERE id = %s AND worker_id = %s AND generation = %s FOR UPDATE",
                (chat_id, fence.worker_id, fence.generation),
            )
            row = await cur.fetchone()
            if row is None:
                raise LeaseLost(chat_id)
            if row["interrupt"] == "resume":
                events += await self._deliver_front(cur, chat_id)
            events.append(self._status_event("running"))
            await self._bump(cur, chat_id, events, fence=fence, set_sql="interrupt = NULL")
            await self._insert_delivered(cur, chat_id, events)
        if committed is not None:
            committed()
        await self._after_commit(chat_id, events)
        return RunInfo(
            chat_id=chat_id,
            owner_id=row["owner_id"],
            model_config_id=row["model_config_id"],
            workspace_id=row["workspace_id"],
            agents_md=row["agents_md"],
        )

    async def _deliver_front(self, cur: AsyncCursor[Any], chat_id: str) -> list[chat_pb2.ChatEvent]:
        """Pop the front queued message; return its message_persisted and queue_changed events."""
        await cur.execute(
            "DELETE FROM chat_queued_messages WHERE id ="
            " (SELECT id FROM chat_queued_messages WHERE chat_id = %s ORDER BY position LIMIT 1)"
            " RETURNING *",
            (chat_id,),
        )
        q = await cur.fetchone()
        if q is None:
            return []
        msg = NewMessage(role="user", parts=parts_mod.from_json(q["parts"]), sender_id=q["sender_id"])
        # The queued message keeps its id, so an idempotent SendMessage finds it in the history.
        return [self._message_event(chat_id, str(q["id"]), msg, now()), await self._queue_event(cur, chat_id)]

    async def _insert_delivered(
        self, cur: AsyncCursor[Any], chat_id: str, events: Sequence[chat_pb2.ChatEvent]
    ) -> None:
        for ev in events:
            if ev.WhichOneof("event") == "message_persisted":
                m = ev.message_persisted
                await self._insert_message(
                    cur,
                    chat_id,
                    m.id,
                    NewMessage(role="user", parts=m.parts, sender_id=m.sender_id),
                    ev.seq,
                    m.create_time.ToDatetime(dt.UTC),
                )

    async def history(self, chat_id: str) -> list[chat_pb2.Message]:
        """Live messages from the last summary on, oldest first."""
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT * FROM chat_messages WHERE chat_id = %(c)s AND NOT deleted AND seq >= coalesce("
                "(SELECT max(seq) FROM chat_messages"
                " WHERE chat_id = %(c)s AND role = 'summary' AND NOT deleted), 0)"
                " ORDER BY seq",
                {"c": chat_id},
            )
            rows = await cur.fetchall()
        return [message_from_row(r) for r in rows]

    async def emit(self, chat_id: str, fence: Fence | None, events: Sequence[chat_pb2.ChatEvent]) -> None:
        """Number and publish streaming events (durable kinds are stored too)."""
        if self._numberer is not None and not any(ev.WhichOneof("event") in DURABLE_KINDS for ev in events):
            try:
                await self._numberer.emit(
                    chat_id, None if fence is None else (fence.worker_id, fence.generation), events
                )
            except Unnumbered:
                if fence is not None:
                    raise LeaseLost(chat_id) from None
                raise chat_not_found(chat_id) from None
            return
        if await self._write1(chat_id, events, fence=fence, notify=False, touch=False) is None:
            if fence is not None:
                raise LeaseLost(chat_id)
            raise chat_not_found(chat_id)
        await self._after_commit(chat_id, events)

    async def persist(
        self,
        chat_id: str,
        fence: Fence | None,
        msg: NewMessage,
        *,
        pre_events: Sequence[chat_pb2.ChatEvent] = (),
        extra_events: Sequence[chat_pb2.ChatEvent] = (),
        message_id: str | None = None,
        guard_idle: bool = False,
        agents_md: str | None = None,
    ) -> chat_pb2.Message:
        """Persist a generated message (fenced), adding its usage to the chat, plus extra events after it.

        `guard_idle` (CompactChat outside a run) requires that no worker owns the chat.
        `agents_md`, when given, is cached on the chat row by the same statement.
        """
        message_id = message_id or str(uuid.uuid4())
        when = now()
        usage = msg.usage or chat_pb2.Usage()
        # `pre_events` (last deltas, last tool result announcement) come just before the message.
        events = [*pre_events, self._message_event(chat_id, message_id, msg, when), *extra_events]
        at = len(pre_events)
        sets = ", ".join(f"{f} = {f} + %({f})s" for f in USAGE_FIELDS)
        params: dict[str, Any] = {f: getattr(usage, f) for f in USAGE_FIELDS}
        if agents_md is not None:
            sets += ", agents_md = %(agents_md)s"
            params["agents_md"] = agents_md
        if not guard_idle:
            # The run's common write: chat row, message and events in one statement.
            row = await self._write1(
                chat_id,
                events,
                fence=fence,
                set_sql=sets,
                params=params,
                message=(message_id, msg, when, at),
            )
            if row is None:
                if fence is not None:
                    raise LeaseLost(chat_id)
                raise chat_not_found(chat_id)
            await self._after_commit(chat_id, events)
            return events[at].message_persisted
        async with self._tx() as cur:
            if guard_idle:
                await cur.execute(
                    "SELECT 1 FROM chat_chats WHERE id = %s AND worker_id IS NULL AND status <> 'pending'"
                    " FOR UPDATE",
                    (chat_id,),
                )
                if await cur.fetchone() is None:
                    raise FailedPrecondition(
                        f"chat {chat_id} started running; compact it when it is idle", reason="CHAT_BUSY"
                    )
            await self._bump(cur, chat_id, events, fence=fence, set_sql=sets, params=params)
            await self._insert_message(cur, chat_id, message_id, msg, events[at].seq, when)
        await self._after_commit(chat_id, events)
        m = events[at].message_persisted
        return m

    async def finish_turn(
        self, chat_id: str, fence: Fence, *, committed: Callable[[], None] | None = None
    ) -> bool:
        """End a turn: deliver the next queued message (True: keep running) or wait for the user.

        Usually one statement. It reads the queue and the chat row's `last_seq` in its snapshot
        and releases the chat only if the fenced row it then locks still has that `last_seq`:
        every queue change bumps `last_seq` under the row lock, so a message queued at the same
        moment either makes the release miss (and we look again) or is stored after it (and the
        sender sees an idle chat and makes it PENDING) -- it is never stranded. A non-empty queue
        takes a second statement that pops its front under the same check. `committed` is called
        right after the commit (see `start_run`).
        """
        waiting = self._status_event("waiting")
        waiting.chat_id = chat_id
        waiting.time.CopyFrom(ts(now()))
        p: dict[str, Any] = {
            "id": chat_id,
            "w": fence.worker_id,
            "g": fence.generation,
            "ev": waiting.SerializeToString(),
        }
        # Loops only when a concurrent change (a send, an interrupt, a queue edit) committed
        # between the statement's snapshot and its row lock; each attempt takes a new snapshot.
        while True:
            async with self._stmt() as cur:
                await cur.execute(
                    "WITH s AS (SELECT last_seq, interrupt FROM chat_chats"
                    " WHERE id = %(id)s AND worker_id = %(w)s AND generation = %(g)s),"
                    " q AS (SELECT id, parts, sender_id, created_at, position FROM chat_queued_messages"
                    " WHERE chat_id = %(id)s ORDER BY position LIMIT 100),"
                    " c AS (UPDATE chat_chats SET"
                    " last_seq = last_seq + CASE WHEN interrupt = 'stop' THEN 0 ELSE 1 END,"
                    " status = 'waiting', worker_id = NULL, lease_expires_at = NULL, interrupt = NULL,"
                    " updated_at = now()"
                    " WHERE id = %(id)s AND worker_id = %(w)s AND generation = %(g)s"
                    " AND last_seq = (SELECT last_seq FROM s)"
                    " AND (interrupt = 'stop' OR NOT EXISTS (SELECT 1 FROM q))"
                    f" RETURNING id, last_seq, {_NOTIFY_WATCH}),"
                    " e AS (INSERT INTO chat_events (chat_id, seq, event)"
                    " SELECT c.id, c.last_seq, %(ev)s FROM c, s WHERE c.last_seq > s.last_seq)"
                    " SELECT s.last_seq AS snap_seq, s.interrupt AS snap_interrupt,"
                    " (SELECT last_seq FROM c) AS new_seq,"
                    " (SELECT json_agg(json_build_object('id', q.id, 'parts', q.parts,"
                    " 'sender_id', q.sender_id, 'created_at', q.created_at) ORDER BY q.position)"
                    " FROM q) AS queue"
                    " FROM (SELECT 1) AS one LEFT JOIN s ON true",
                    p,
                )
                row = await cur.fetchone()
            assert row is not None
            if row["snap_seq"] is None:
                raise LeaseLost(chat_id)  # generations only grow: the fence never comes back
            snap_seq = int(row["snap_seq"])
            if row["new_seq"] is not None:
                events: list[chat_pb2.ChatEvent] = []
                if int(row["new_seq"]) > snap_seq:
                    waiting.seq = int(row["new_seq"])
                    events.append(waiting)
                if committed is not None:
                    committed()
                await self._after_commit(chat_id, events)
                return False
            queue = row["queue"] or []
            if queue and row["snap_interrupt"] != "stop":
                if await self._deliver_next(chat_id, fence, snap_seq, queue, committed):
                    return True

    async def _deliver_next(
        self,
        chat_id: str,
        fence: Fence,
        expected_seq: int,
        queue: list[dict[str, Any]],
        committed: Callable[[], None] | None,
    ) -> bool:
        """Move the front of `queue` (read at `expected_seq`) into the history, in one statement.

        False (nothing written) when the chat row changed since that read: the caller looks again.
        """
        for q in queue:
            q["chat_id"] = chat_id
            q["created_at"] = dt.datetime.fromisoformat(q["created_at"])
        front, rest = queue[0], queue[1:]
        when = now()
        msg = NewMessage(role="user", parts=parts_mod.from_json(front["parts"]), sender_id=front["sender_id"])
        # The queued message keeps its id, so an idempotent SendMessage finds it in the history.
        events = [
            self._message_event(chat_id, str(front["id"]), msg, when),
            chat_pb2.ChatEvent(
                queue_changed=chat_pb2.QueueChanged(
                    queued_messages=[queued_from_row(r, i + 1) for i, r in enumerate(rest)]
                )
            ),
        ]
        stamp = ts(when)
        for ev in events:
            ev.chat_id = chat_id
            ev.time.CopyFrom(stamp)
        async with self._stmt() as cur:
            await cur.execute(
                "WITH c AS (UPDATE chat_chats SET last_seq = last_seq + 2, status = 'running',"
                " interrupt = NULL, updated_at = now()"
                " WHERE id = %(id)s AND worker_id = %(w)s AND generation = %(g)s AND last_seq = %(expected)s"
                " AND interrupt IS DISTINCT FROM 'stop'"
                f" RETURNING id, last_seq, {_NOTIFY_WATCH}),"
                # Only when the row still matched: the queue is then exactly what we read.
                " d AS (DELETE FROM chat_queued_messages WHERE id = %(q_id)s AND chat_id = %(id)s"
                " AND EXISTS (SELECT 1 FROM c) RETURNING id),"
                " m AS (INSERT INTO chat_messages (id, chat_id, seq, role, parts, visibility, sender_id,"
                " created_at) SELECT %(q_id)s, c.id, c.last_seq - 1, 'user', %(parts)s, %(vis)s, %(sender)s,"
                " %(when)s FROM c),"
                " e AS (INSERT INTO chat_events (chat_id, seq, event)"
                " SELECT c.id, c.last_seq - 2 + d.i, d.ev FROM c,"
                " unnest(%(evs)s::bytea[]) WITH ORDINALITY AS d(ev, i))"
                " SELECT c.last_seq FROM c",
                {
                    "id": chat_id,
                    "w": fence.worker_id,
                    "g": fence.generation,
                    "expected": expected_seq,
                    "q_id": str(front["id"]),
                    "parts": Jsonb(front["parts"]),
                    "vis": msg.visibility,
                    "sender": msg.sender_id,
                    "when": when,
                    "evs": [ev.SerializeToString() for ev in events],
                },
            )
            row = await cur.fetchone()
        if row is None:
            return False
        for i, ev in enumerate(events):
            ev.seq = int(row["last_seq"]) - 1 + i
        events[0].message_persisted.seq = events[0].seq
        if committed is not None:
            committed()
        await self._after_commit(chat_id, events)
        return True

    async def fail_run(self, chat_id: str, fence: Fence, reason: str, message: str) -> None:
        """End a run in ERROR with last_error."""
        events = [
            chat_pb2.ChatEvent(error=chat_pb2.ChatError(reason=reason, message=message, time=ts(now()))),
            self._status_event("error", reason, message),
        ]
        async with self._tx() as cur:
            await self._bump(
                cur,
                chat_id,
                events,
                fence=fence,
                set_sql="status = 'error', worker_id = NULL, lease_expires_at = NULL, interrupt = NULL,"
                " last_error_reason = %(r)s, last_error_message = %(m)s, last_error_time = now()",
                params={"r": reason, "m": message},
            )
        await self._after_commit(chat_id, events)

    async def release(self, chat_id: str, fence: Fence) -> None:
        """Give a chat back as PENDING (worker shutting down); another worker continues it."""
        async with self._tx() as cur:
            await cur.execute(
                "UPDATE chat_chats SET status = CASE WHEN status = 'running' THEN 'pending' ELSE status END,"
                " worker_id = NULL, lease_expires_at = NULL, generation = generation + 1"
                " WHERE id = %s AND worker_id = %s AND generation = %s RETURNING status",
                (chat_id, fence.worker_id, fence.generation),
            )
            row = await cur.fetchone()
            if row is not None and row["status"] == "pending":
                await cur.execute("SELECT pg_notify(%s, %s)", (PENDING_CHANNEL, chat_id))

    async def run_info(self, chat_id: str) -> RunInfo:
        """Chat facts for a run outside a worker (CompactChat)."""
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.execute("SELECT * FROM chat_chats WHERE id = %s", (chat_id,))
            row = await cur.fetchone()
        if row is None:
            raise chat_not_found(chat_id)
        return RunInfo(
            chat_id, row["owner_id"], row["model_config_id"], row["workspace_id"], row["agents_md"]
        )


def _chat_row_update(
    chat_id: str,
    n: int,
    fence: Fence | None,
    set_sql: str,
    where_sql: str,
    params: dict[str, Any] | None,
    touch: bool,
) -> tuple[str, str, dict[str, Any]]:
    """SET list, WHERE clause and parameters of an update that takes `n` seqs from a chat row,
    fenced by the run's worker and generation when `fence` is given."""
    p: dict[str, Any] = {"id": chat_id, "n": n, **(params or {})}
    sets = ["last_seq = last_seq + %(n)s"]
    if touch:
        sets.append("updated_at = now()")
    if set_sql:
        sets.append(set_sql)
    where = "id = %(id)s"
    if fence is not None:
        where += " AND worker_id = %(fence_w)s AND generation = %(fence_g)s"
        p["fence_w"], p["fence_g"] = fence.worker_id, fence.generation
    if where_sql:
        where += f" AND {where_sql}"
    return ", ".join(sets), where, p
