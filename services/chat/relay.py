"""Live chat events through Postgres NOTIFY while Redis is unreachable.

Streaming events (deltas, tool calls starting and finishing, retries) live only in memory and in
Redis: without Redis, a StreamChat on a replica other than the run's owner would see only the
durable events it reads from Postgres. While a replica cannot reach Redis, its `EventHub` hands
every event it publishes to this relay too. One task sends what accumulated meanwhile as NOTIFYs
on one channel, in one statement per round (no wait for the WAL flush: notifications are not
data), so a busy replica sends a handful of statements a second whatever the number of chats.
Every replica LISTENs on the channel (`notify.Notifier`) and offers the events of the chats it
has subscribers for (`EventHub.relayed`).

A NOTIFY payload is text shorter than 8000 bytes: ``<origin> <chat id> <i>/<n> <piece>``. A
round's events of one chat, length-prefixed as on Redis (`pack`) and base64-encoded, are cut into
`n` pieces; the receiver joins pieces 0..n-1 and unpacks them. Postgres delivers the
notifications of one statement together and in order, after those of earlier statements, so
pieces never interleave and events arrive in the order they were published; a receiver that
missed a piece (its LISTEN connection was re-opened) drops the rest of that round, which its
subscribers see as a gap (they fill the durable events from Postgres). An event larger than
`MAX_EVENT_BYTES` is sent as a stub with only its seq: the receiver reads it from Postgres if it
is durable (a huge persisted message); a streaming event that large is missed elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import struct
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from agentplane.chat.v1 import chat_pb2
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

RELAY_CHANNEL = "agentplane_chat_live"
# Postgres refuses payloads of 8000 bytes or more.
MAX_PAYLOAD = 7999
# Larger events go as stubs (about 45 notifications: beyond that Postgres is the cheaper path).
MAX_EVENT_BYTES = 256 * 1024
# Room kept in each payload for the "<i>/<n> " field.
_PIECE_FIELD = 24
_LENGTH = struct.Struct(">I")

# One statement: synchronous_commit off for its own transaction, then one pg_notify per payload,
# in array order (a function scan returns the elements in order).
_NOTIFY_SQL = (
    "SELECT pg_notify(%s, p) FROM (SELECT set_config('synchronous_commit', 'off', true)) AS s,"
    " unnest(%s::text[]) AS p"
)


def pack(events: Sequence[chat_pb2.ChatEvent]) -> bytes:
    """Events as (length, serialized event) frames."""
    out = bytearray()
    for ev in events:
        data = ev.SerializeToString()
        out += _LENGTH.pack(len(data))
        out += data
    return bytes(out)


def unpack(data: bytes, pos: int = 0) -> list[chat_pb2.ChatEvent]:
    """The events of `pack`ed frames starting at `pos`."""
    out = []
    size = len(data)
    while pos < size:
        (length,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        out.append(chat_pb2.ChatEvent.FromString(data[pos : pos + length]))
        pos += length
    return out


def is_stub(event: chat_pb2.ChatEvent) -> bool:
    """Whether `event` stands for one too large to relay (read it from Postgres)."""
    return event.WhichOneof("event") is None


def payloads(origin: str, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> list[str]:
    """The NOTIFY payloads carrying `events` of `chat_id` (see the module docstring)."""
    data = bytearray()
    for ev in events:
        frame = pack([ev])
        if len(frame) > MAX_EVENT_BYTES:
            frame = pack([chat_pb2.ChatEvent(seq=ev.seq, chat_id=ev.chat_id)])
        data += frame
    text = base64.b64encode(data).decode()
    header = f"{origin} {chat_id} "
    room = MAX_PAYLOAD - len(header) - _PIECE_FIELD
    pieces = [text[i : i + room] for i in range(0, len(text), room)] or [""]
    return [f"{header}{i}/{len(pieces)} {piece}" for i, piece in enumerate(pieces)]


class PgRelay:
    """Sends chat events as NOTIFYs on `RELAY_CHANNEL` (see the module docstring).

    `send` never waits for the database: the events queue (at most `max_pending`; beyond that
    they are dropped, which subscribers see as a gap) and one task sends them in order.
    """

    def __init__(self, pool: AsyncConnectionPool[Any], *, max_pending: int = 10_000) -> None:
        self._pool = pool
        self.origin = uuid.uuid4().hex[:16]
        self._max_pending = max_pending
        self._pending: list[tuple[str, list[chat_pb2.ChatEvent]]] = []
        self._count = 0
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        # Receiving: the pieces so far of a round cut into several notifications, by sender and chat.
        self._partial: dict[tuple[str, str], list[str]] = {}
        self.sent = 0  # notifications sent (tests read it)

    def send(self, chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        """Queue committed events of `chat_id` for the other replicas."""
        if not events:
            return
        if self._count + len(events) > self._max_pending:
            return
        self._pending.append((chat_id, list(events)))
        self._count += len(events)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="chat-event-relay")

    def receive(self, payload: str, wanted: Callable[[str], bool]) -> tuple[str, list[chat_pb2.ChatEvent]]:
        """(chat id, events) once a notification completes another replica's round for a chat
        that is `wanted`; the events are empty for our own notifications, other chats, a piece
        that is not the last, and a round with a piece missed."""
        origin, chat_id, piece, data = payload.split(" ", 3)
        if origin == self.origin or not wanted(chat_id):
            return chat_id, []
        index, _, count = piece.partition("/")
        i, n = int(index), int(count)
        if n == 1:
            return chat_id, unpack(base64.b64decode(data))
        key = (origin, chat_id)
        if i == 0:
            self._partial[key] = [data]
        else:
            got = self._partial.get(key)
            if got is None or len(got) != i:
                self._partial.pop(key, None)
                return chat_id, []
            got.append(data)
        if i < n - 1:
            return chat_id, []
        return chat_id, unpack(base64.b64decode("".join(self._partial.pop(key))))

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending, self._count = self._pending, [], 0
            merged: dict[str, list[chat_pb2.ChatEvent]] = {}
            for chat_id, events in batch:  # keeps each chat's order
                merged.setdefault(chat_id, []).extend(events)
            notes = [p for chat_id, events in merged.items() for p in payloads(self.origin, chat_id, events)]
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(_NOTIFY_SQL, (RELAY_CHANNEL, notes))
            except Exception as exc:  # the database is down too: these events are lost to others
                if not self._failing:
                    self._failing = True
                    log.warning("relaying chat events through postgres failed", extra={"error": str(exc)})
                continue
            self.sent += len(notes)
            if self._failing:
                self._failing = False
                log.info("relaying chat events through postgres works again")

    async def close(self) -> None:
        """Send what is queued (bounded), then stop."""
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
