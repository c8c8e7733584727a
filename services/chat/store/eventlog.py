"""The chat's event log: the one writer that takes seqs from a chat row and stores what they number.

A change clients should see (a message, a status change, a queue change...) is a list of
events. It takes ``n = len(events)`` seqs from ``chat_chats.last_seq`` in the statement that
makes the change; the row lock orders writers, so seq N+1 is never committed before seq N.
With ``last_seq`` the row's new value, the change's i-th event (from 0) has the seq

    last_seq - n + 1 + i

and that rule lives here only: `_SEQ` in SQL, `number` in Python. Every INSERT into
chat_messages and chat_events is built by `log_ctes`, as CTEs hanging off the statement's
update of the chat row:

- the message of each ``message_persisted`` event is stored in chat_messages with the event's
  seq (so a change's messages are exactly the messages it announces);
- durable events are stored in chat_events serialized without seq and chat_id: the columns are
  the truth and `events_between` puts them back. That keeps the whole change one statement,
  and lets one serialized event serve many chats (see `Leases.claim`).

Events are published to the event bus only after the commit: no network call happens while a
transaction is open. Streaming events (deltas) are numbered in batches by `EventNumberer`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from agentplane.chat.v1 import chat_pb2
from psycopg import AsyncCursor
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.chat import parts as parts_mod
from services.chat.deltas import EventNumberer, Unnumbered
from services.chat.domain import Fence, LeaseLost
from services.chat.store.channels import NOTIFY_WATCH
from services.chat.store.rows import PB_TO_ROLE, USAGE_FIELDS, chat_not_found, now, ts

Publisher = Callable[[str, Sequence[chat_pb2.ChatEvent]], Awaitable[None]]

DURABLE_KINDS = frozenset(
    {"status_changed", "message_persisted", "queue_changed", "error", "history_truncated", "reply_discarded"}
)

# The number of seqs a change takes, as a statement parameter (set by `log_ctes`).
N = "%(log_n)s"
# The seq of the change's event `d.i` (see the module docstring), for the chat row(s) `{row}`.
_SEQ = "{row}.last_seq - %(log_n)s + 1 + d.i"
# chat_messages columns a message_persisted event fills, with their types.
_MESSAGE_COLUMNS = (
    ("id", "uuid"),
    ("role", "text"),
    ("parts", "jsonb"),
    ("visibility", "smallint"),
    ("model_config_id", "text"),
    ("runtime_ms", "bigint"),
    ("sender_id", "text"),
    *((f, "bigint") for f in USAGE_FIELDS),
    ("created_at", "timestamptz"),
)
_MESSAGE_NAMES = ", ".join(name for name, _ in _MESSAGE_COLUMNS)
_MESSAGE_VALUES = ", ".join(f"d.{name}" for name, _ in _MESSAGE_COLUMNS)
_MESSAGE_TYPED = ", ".join(f"{name} {kind}" for name, kind in _MESSAGE_COLUMNS)


def _message_row(i: int, m: chat_pb2.Message) -> dict[str, Any]:
    """The chat_messages values of the change's `i`-th event's message (`_MESSAGE_COLUMNS`)."""
    return {
        "i": i,
        "id": m.id,
        "role": PB_TO_ROLE[m.role],
        "parts": parts_mod.to_json(m.parts),
        "visibility": int(m.visibility),
        "model_config_id": m.model_config_id,
        "runtime_ms": m.runtime.seconds * 1000 + m.runtime.nanos // 10**6,
        "sender_id": m.sender_id,
        **{f: getattr(m.usage, f) for f in USAGE_FIELDS},
        "created_at": m.create_time.ToJsonString(),
    }


def log_ctes(
    chat_id: str | None,
    events: Sequence[chat_pb2.ChatEvent],
    *,
    row: str = "c",
    only_if: str = "",
    when: dt.datetime | None = None,
) -> tuple[str, dict[str, Any]]:
    """The CTEs that store the change `events`: its messages and its durable events.

    `row` names the statement's CTE that took `N` seqs from the chat row(s) and RETURNs their
    ``id`` and new ``last_seq``; `only_if` is an SQL condition on it under which the change is
    stored (for a row that takes its seqs only sometimes). Stamps the events with the time
    (`when`, else now) and `chat_id` (None: the caller stamps each chat's copy). Returns SQL
    to append after the row's CTE (``, m AS (...), e AS (...)``, each only when needed) and
    its parameters (all named ``log_*``). Number the events with `number` once it ran.
    """
    stamp = ts(when or now())
    messages: list[dict[str, Any]] = []
    offsets: list[int] = []
    blobs: list[bytes] = []
    for i, ev in enumerate(events):
        ev.time.CopyFrom(stamp)
        ev.ClearField("chat_id")
        kind = ev.WhichOneof("event")
        if kind == "message_persisted":
            messages.append(_message_row(i, ev.message_persisted))
        if kind in DURABLE_KINDS:
            offsets.append(i)
            blobs.append(ev.SerializeToString())
        if chat_id is not None:
            ev.chat_id = chat_id
    seq = _SEQ.format(row=row)
    where = f" WHERE {only_if}" if only_if else ""
    params: dict[str, Any] = {"log_n": len(events)}
    sql = ""
    if messages:
        # One JSON parameter for any number of messages: cheaper to send than an array per column.
        sql += (
            f", m AS (INSERT INTO chat_messages (chat_id, seq, {_MESSAGE_NAMES})"
            f" SELECT {row}.id, {seq}, {_MESSAGE_VALUES}"
            f" FROM {row}, jsonb_to_recordset(%(log_m)s) AS d(i int, {_MESSAGE_TYPED}){where})"
        )
        params["log_m"] = Jsonb(messages)
    if offsets:
        sql += (
            f", e AS (INSERT INTO chat_events (chat_id, seq, event) SELECT {row}.id, {seq}, d.ev"
            f" FROM {row}, unnest(%(log_e_i)s::int[], %(log_e_ev)s::bytea[]) AS d(i, ev){where})"
        )
        params["log_e_i"], params["log_e_ev"] = offsets, blobs
    return sql, params


def number(events: Sequence[chat_pb2.ChatEvent], last_seq: int) -> None:
    """Give `events` the seqs their change took, the chat row's `last_seq` being its new value."""
    first = last_seq - len(events) + 1
    for i, ev in enumerate(events):
        ev.seq = first + i
        if ev.WhichOneof("event") == "message_persisted":
            ev.message_persisted.seq = ev.seq


def stored_event(chat_id: str, seq: int, data: bytes) -> chat_pb2.ChatEvent:
    """An event read back from chat_events, with the seq and chat_id its columns hold."""
    ev = chat_pb2.ChatEvent.FromString(data)
    ev.seq, ev.chat_id = seq, chat_id
    if ev.WhichOneof("event") == "message_persisted":
        ev.message_persisted.seq = seq
    return ev


def lost(chat_id: str, fence: Fence | None) -> Exception:
    """Why a change's chat row did not match: the run's fence is gone, or the chat is."""
    return LeaseLost(chat_id) if fence is not None else chat_not_found(chat_id)


class EventLog:
    """Runs the changes of chats (see the module docstring) and publishes their events."""

    def __init__(self, pool: AsyncConnectionPool[Any], publish: Publisher, numberer: EventNumberer):
        if not (isinstance(pool.kwargs, dict) and pool.kwargs.get("autocommit")):
            # `stmt` relies on it: without autocommit its statements would never commit.
            raise ValueError("the chat store needs an autocommit pool: build it with create_chat_pool")
        self.pool = pool
        self._publish = publish
        # Streaming events of all chats share batched seq statements (see services/chat/deltas.py).
        self._numberer = numberer

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[AsyncCursor[Any]]:
        """A cursor in a transaction that commits when the block ends."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    @asynccontextmanager
    async def stmt(self) -> AsyncIterator[AsyncCursor[Any]]:
        """A cursor for one statement that commits by itself (no BEGIN/COMMIT round trips)."""
        async with self.pool.connection() as conn, conn.cursor() as cur:
            yield cur

    async def publish(self, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        """Hand committed events to the event bus."""
        if events:
            await self._publish(chat_id, events)

    async def write(
        self,
        chat_id: str,
        events: Sequence[chat_pb2.ChatEvent],
        *,
        fence: Fence | None = None,
        set_sql: str = "",
        where_sql: str = "",
        params: dict[str, Any] | None = None,
        notify: bool = True,
        touch: bool = True,
        returning: str = "",
        cur: AsyncCursor[Any] | None = None,
    ) -> dict[str, Any] | None:
        """One statement: take seqs for `events` from the chat row (fenced by `fence`), apply
        `set_sql` to it, store the change (`log_ctes`); then number `events`.

        Runs on `cur` (the caller's transaction) or commits by itself. `notify` tells WatchChats
        subscribers, `touch` moves ``updated_at``; `returning` adds items to the returned row.
        Returns the row (with ``last_seq``), or None when no row matched (fence lost, chat gone
        or `where_sql` false): then nothing was written. Publishing is the caller's, after commit.
        """
        log, p = log_ctes(chat_id, events)
        p.update(params or {}, id=chat_id)
        sets = [f"last_seq = last_seq + {N}"]
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
        ret = ", ".join(c for c in ("id, last_seq", returning, NOTIFY_WATCH if notify else "") if c)
        sql = f"WITH c AS (UPDATE chat_chats SET {', '.join(sets)} WHERE {where} RETURNING {ret}){log}"
        sql += " SELECT * FROM c"
        if cur is None:
            async with self.stmt() as own:
                await own.execute(sql, p)
                row = await own.fetchone()
        else:
            await cur.execute(sql, p)
            row = await cur.fetchone()
        if row is None:
            return None
        number(events, int(row["last_seq"]))
        return dict(row)

    async def emit(self, chat_id: str, fence: Fence | None, events: Sequence[chat_pb2.ChatEvent]) -> None:
        """Number and publish events that change nothing else (durable kinds are stored too).

        Raises `lost` when the chat row did not match.
        """
        if not any(ev.WhichOneof("event") in DURABLE_KINDS for ev in events):
            try:
                await self._numberer.emit(
                    chat_id, None if fence is None else (fence.worker_id, fence.generation), events
                )
            except Unnumbered:
                raise lost(chat_id, fence) from None
            return
        if await self.write(chat_id, events, fence=fence, notify=False, touch=False) is None:
            raise lost(chat_id, fence)
        await self.publish(chat_id, events)


class Part:
    """What every part of the store shares: the pool and the event log."""

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._pool = log.pool
