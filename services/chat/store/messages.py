"""A chat's messages and queue as its owner changes them: send, edit, queue, interrupt.

The busy/idle rule: a chat is idle when no worker owns it and it is WAITING or in ERROR. A
message sent to an idle chat goes into the history and makes the chat PENDING; one sent to a
busy chat is queued (at the back, or at the front with an interrupt that makes the running
worker deliver it next).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from agentplane.chat.v1 import chat_pb2
from psycopg import AsyncCursor
from psycopg.types.json import Jsonb

from services.chat import parts as parts_mod
from services.chat.domain import NewMessage
from services.chat.store import queries
from services.chat.store.channels import NOTIFY_INTERRUPT, NOTIFY_PENDING, NOTIFY_WATCH
from services.chat.store.eventlog import N, Part, log_ctes, number
from services.chat.store.leases import owner_gone
from services.chat.store.rows import (
    bad_token,
    chat_from_row,
    decode_token,
    encode_token,
    message_event,
    message_from_row,
    now,
    queued_not_found,
    status_event,
)
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

SendResult = tuple[chat_pb2.Chat, chat_pb2.Message | None, chat_pb2.QueuedMessage | None]
# Clears the last error of a chat that runs again.
_CLEAR_ERROR = "last_error_reason = NULL, last_error_message = NULL, last_error_time = NULL"


class Messages(Part):
    """Send, edit, list messages; list, delete and promote queued ones; interrupt."""

    max_queued: int = 20

    async def send_message(
        self,
        *,
        owner_id: str,
        chat_id: str,
        request_id: str,
        content: Sequence[chat_pb2.ContentPart],
        interrupt: bool,
    ) -> SendResult:
        """Add a user message: into the history when idle, else queued (or queued first + interrupt).

        Messages run in the order they were sent: an idle chat whose queue is not empty (its last
        turn failed or was stopped with messages queued) runs the front of the queue now and
        queues this one behind the rest, unless `interrupt` asks to run this one first.
        """
        new_id = str(uuid.uuid4())
        when = now()
        sent = await self._send_when_idle(owner_id, chat_id, request_id, content, new_id, when, interrupt)
        if sent is not None:
            return sent
        # Not the common case (busy, a repeated request id, a race): lock the row and look.
        async with self._log.tx() as cur:
            row = await queries.lock_chat(cur, owner_id, chat_id)
            earlier = await queries.record_request(cur, owner_id, "send", request_id, chat_id, new_id)
            if earlier is not None:
                if str(earlier["chat_id"]) != chat_id:
                    raise InvalidArgument("request_id", "was already used for a message to another chat")
                return await self._earlier_send(cur, chat_id, str(earlier["message_id"]))
            idle = row["worker_id"] is None and row["status"] in ("waiting", "error")
            delivered = await queries.pop_front(cur, chat_id) if idle and not interrupt else []
            if delivered:
                events, queued = await self._run_queue_first(cur, row, delivered[0], content, new_id, when)
                result: SendResult = (await queries.read_chat(cur, chat_id), None, queued)
            elif idle:
                msg = NewMessage(role="user", parts=content, sender_id=owner_id)
                events = [message_event(chat_id, new_id, msg, when), status_event("pending")]
                await self._log.write(
                    chat_id,
                    events,
                    set_sql=f"status = 'pending', {_CLEAR_ERROR}",
                    returning=NOTIFY_PENDING,
                    cur=cur,
                )
                result = (
                    await queries.read_chat(cur, chat_id),
                    await queries.read_message(cur, chat_id, new_id),
                    None,
                )
            else:
                events, queued = await self._enqueue(cur, row, content, new_id, when, interrupt)
                result = (await queries.read_chat(cur, chat_id), None, queued)
        await self._log.publish(chat_id, events)
        return result

    async def _run_queue_first(
        self,
        cur: AsyncCursor[Any],
        row: dict[str, Any],
        front: chat_pb2.ChatEvent,
        content: Sequence[chat_pb2.ContentPart],
        new_id: str,
        when: dt.datetime,
    ) -> tuple[list[chat_pb2.ChatEvent], chat_pb2.QueuedMessage]:
        """An idle chat (`row`, locked) whose queue's front `queries.pop_front` just took (`front`,
        its message_persisted event): queue the new message at the back and make the chat
        PENDING, one change with `front`. Its events (numbered) and the new entry.

        The front left first, so a full queue still takes the new message.
        """
        chat_id = str(row["id"])
        await self._insert_queued(cur, row, content, new_id, when, front=False)
        events = [front, await queries.queue_event(cur, chat_id), status_event("pending")]
        await self._log.write(
            chat_id,
            events,
            set_sql=f"status = 'pending', {_CLEAR_ERROR}",
            returning=NOTIFY_PENDING,
            cur=cur,
        )
        return events, next(m for m in events[1].queue_changed.queued_messages if m.id == new_id)

    async def _enqueue(
        self,
        cur: AsyncCursor[Any],
        row: dict[str, Any],
        content: Sequence[chat_pb2.ContentPart],
        new_id: str,
        when: dt.datetime,
        interrupt: bool,
    ) -> tuple[list[chat_pb2.ChatEvent], chat_pb2.QueuedMessage]:
        """Queue a message for the busy chat `row` (locked); its events (numbered) and the entry."""
        chat_id = str(row["id"])
        # A worker that already set WAITING is finishing its turn: put the message first and
        # wake it, so it delivers the message instead of releasing the chat.
        finishing = row["worker_id"] is not None and row["status"] == "waiting"
        front = interrupt or finishing
        await self._insert_queued(cur, row, content, new_id, when, front=front)
        wake = row["worker_id"] is not None and front
        events = [await queries.queue_event(cur, chat_id)]
        await self._log.write(
            chat_id,
            events,
            set_sql="interrupt = 'resume'" if wake else "",
            returning=NOTIFY_INTERRUPT if wake else "",
            cur=cur,
        )
        return events, next(m for m in events[0].queue_changed.queued_messages if m.id == new_id)

    async def _insert_queued(
        self,
        cur: AsyncCursor[Any],
        row: dict[str, Any],
        content: Sequence[chat_pb2.ContentPart],
        new_id: str,
        when: dt.datetime,
        *,
        front: bool,
    ) -> None:
        """Insert a message into the queue of the chat `row` (locked), first or last; QUEUE_FULL
        when it holds `max_queued` already."""
        chat_id = str(row["id"])
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
            (new_id, chat_id, position, Jsonb(parts_mod.to_json(content)), row["owner_id"], when),
        )

    async def _send_when_idle(
        self,
        owner_id: str,
        chat_id: str,
        request_id: str,
        content: Sequence[chat_pb2.ContentPart],
        new_id: str,
        when: dt.datetime,
        interrupt: bool,
    ) -> SendResult | None:
        """The common case of `send_message` (an idle chat, a new request id) in one statement.

        The chat row's update matches only an idle chat of the owner whose request id is new and
        whose queue is empty (unless `interrupt`: the message runs before the queue); the
        idempotency key, the message and its two durable events hang off its RETURNING. None (and
        nothing written): not the common case; the caller takes the general path.

        It runs inside a transaction for the one race this snapshot cannot see: a concurrent
        duplicate committing its key first. The key's insert then does nothing while the rest
        of the statement stored the message, so the transaction is rolled back.
        """
        msg = NewMessage(role="user", parts=content, sender_id=owner_id)
        events = [message_event(chat_id, new_id, msg, when), status_event("pending")]
        log, p = log_ctes(chat_id, events, when=when)
        p.update(id=chat_id, owner=owner_id, rid=request_id, m_id=new_id, first=interrupt)
        async with self._pool.connection() as conn, conn.transaction() as tx, conn.cursor() as cur:
            await cur.execute(
                f"WITH c AS (UPDATE chat_chats SET last_seq = last_seq + {N}, updated_at = now(),"
                f" status = 'pending', {_CLEAR_ERROR}"
                " WHERE id = %(id)s AND owner_id = %(owner)s AND worker_id IS NULL"
                " AND status IN ('waiting', 'error') AND NOT EXISTS (SELECT 1 FROM chat_requests"
                " WHERE owner_id = %(owner)s AND kind = 'send' AND request_id = %(rid)s)"
                " AND (%(first)s OR NOT EXISTS (SELECT 1 FROM chat_queued_messages WHERE chat_id = %(id)s))"
                f" RETURNING *, {NOTIFY_PENDING}, {NOTIFY_WATCH}),"
                " r AS (INSERT INTO chat_requests (owner_id, kind, request_id, chat_id, message_id)"
                " SELECT %(owner)s, 'send', %(rid)s, c.id, %(m_id)s FROM c WHERE %(rid)s <> ''"
                f" ON CONFLICT DO NOTHING RETURNING chat_id){log}"
                " SELECT c.*, (SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = c.id)"
                " AS queued_count, %(rid)s = '' OR EXISTS (SELECT 1 FROM r) AS _recorded FROM c",
                p,
            )
            row = await cur.fetchone()
            if row is None or not row["_recorded"]:
                tx.force_rollback = True  # ends the block without committing a thing
                return None
        number(events, int(row["last_seq"]))
        message = chat_pb2.Message()
        message.CopyFrom(events[0].message_persisted)
        await self._log.publish(chat_id, events)
        return chat_from_row(row), message, None

    async def _earlier_send(self, cur: AsyncCursor[Any], chat_id: str, message_id: str) -> SendResult:
        """What a repeated SendMessage request id did the first time."""
        chat = await queries.read_chat(cur, chat_id)
        await cur.execute("SELECT * FROM chat_messages WHERE id = %s", (message_id,))
        row = await cur.fetchone()
        if row is not None:
            return chat, message_from_row(row), None
        for q in await queries.queued(cur, chat_id):
            if q.id == message_id:
                return chat, None, q
        # The queued message was deleted by the user: the request happened; nothing to return.
        return chat, None, None

    async def edit_message(
        self,
        *,
        owner_id: str,
        chat_id: str,
        message_id: str,
        content: Sequence[chat_pb2.ContentPart],
        request_id: str = "",
    ) -> tuple[chat_pb2.Chat, chat_pb2.Message]:
        """Replace a user message: soft-delete it and everything after, add the new one, run again.

        A repeated `request_id` changes nothing and returns the chat and the message the first
        edit stored (its key is recorded in the edit's transaction, under the chat row's lock, so
        concurrent duplicates are ordered too).
        """
        new_id = str(uuid.uuid4())
        when = now()
        async with self._log.tx() as cur:
            await queries.lock_chat(cur, owner_id, chat_id)
            earlier = await queries.record_request(cur, owner_id, "edit", request_id, chat_id, new_id)
            if earlier is not None:
                if str(earlier["chat_id"]) != chat_id:
                    raise InvalidArgument("request_id", "was already used for an edit in another chat")
                return (
                    await queries.read_chat(cur, chat_id),
                    await queries.read_message(cur, chat_id, str(earlier["message_id"])),
                )
            old = await queries.live_message(cur, chat_id, message_id)
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
                message_event(chat_id, new_id, msg, when),
                status_event("pending"),
            ]
            # A new generation takes the chat away from any worker running it: its writes now fail.
            await self._log.write(
                chat_id,
                events,
                set_sql="status = 'pending', worker_id = NULL, lease_expires_at = NULL,"
                f" generation = generation + 1, interrupt = NULL, {_CLEAR_ERROR}",
                returning=f"{NOTIFY_PENDING}, {NOTIFY_INTERRUPT}",
                cur=cur,
            )
            chat = await queries.read_chat(cur, chat_id)
            message = await queries.read_message(cur, chat_id, new_id)
        await self._log.publish(chat_id, events)
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
                raise bad_token("page_token") from None
        async with self._log.stmt() as cur:  # reads: no transaction needed
            await queries.check_owned(cur, owner_id, chat_id)
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

    async def list_queued(
        self, owner_id: str, chat_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[chat_pb2.QueuedMessage], str]:
        """Queued messages, next first."""
        offset = 0
        if page_token:
            try:
                offset = int(decode_token("page_token", page_token)["o"])
            except (KeyError, ValueError, TypeError):
                raise bad_token("page_token") from None
        async with self._log.tx() as cur:
            await queries.check_owned(cur, owner_id, chat_id)
            queued = await queries.queued(cur, chat_id)
        page = queued[offset : offset + page_size]
        token = encode_token({"o": offset + page_size}) if offset + page_size < len(queued) else ""
        return page, token

    async def delete_queued(self, owner_id: str, chat_id: str, queued_id: str) -> bool:
        """Remove a queued message; False (nothing changed, no event) when it is not there.

        Idempotent: the message may have been deleted already, delivered into the history (where
        it keeps its id), or never queued in this chat; the chat may be gone or another user's.
        None of these is an error, and they are not told apart.
        """
        async with self._log.tx() as cur:
            await cur.execute(
                "SELECT 1 FROM chat_chats WHERE id = %s AND owner_id = %s FOR UPDATE", (chat_id, owner_id)
            )
            if await cur.fetchone() is None:
                return False
            await cur.execute(
                "DELETE FROM chat_queued_messages WHERE id = %s AND chat_id = %s RETURNING id",
                (queued_id, chat_id),
            )
            if await cur.fetchone() is None:
                return False
            events = [await queries.queue_event(cur, chat_id)]
            await self._log.write(chat_id, events, cur=cur)
        await self._log.publish(chat_id, events)
        return True

    async def promote_queued(
        self, owner_id: str, chat_id: str, queued_id: str
    ) -> list[chat_pb2.QueuedMessage]:
        """Move a queued message to the front."""
        async with self._log.tx() as cur:
            await queries.lock_chat(cur, owner_id, chat_id)
            await cur.execute(
                "UPDATE chat_queued_messages SET position ="
                " (SELECT min(position) - 1 FROM chat_queued_messages WHERE chat_id = %s)"
                " WHERE id = %s AND chat_id = %s RETURNING id",
                (chat_id, queued_id, chat_id),
            )
            if await cur.fetchone() is None:
                raise queued_not_found(chat_id, queued_id)
            events = [await queries.queue_event(cur, chat_id)]
            await self._log.write(chat_id, events, cur=cur)
        await self._log.publish(chat_id, events)
        return list(events[0].queue_changed.queued_messages)

    async def interrupt(self, owner_id: str, chat_id: str) -> chat_pb2.Chat:
        """Stop the current turn: the chat waits; a running worker is told to wrap up."""
        events: list[chat_pb2.ChatEvent] = []
        async with self._log.tx() as cur:
            row = await queries.lock_chat(cur, owner_id, chat_id)
            if row["worker_id"] is not None and await owner_gone(cur, chat_id):
                # Its worker died or lost its database session: no run will ever wrap up and release
                # the chat, so it becomes idle and unowned now (a new generation fences any late
                # write) and the next message runs. Queued messages stay queued, as after any stop.
                if row["status"] in ("running", "pending"):
                    events = [status_event("waiting")]
                await self._log.write(
                    chat_id,
                    events,
                    set_sql=("status = 'waiting', " if events else "")
                    + "interrupt = NULL, worker_id = NULL, lease_expires_at = NULL,"
                    " generation = generation + 1",
                    cur=cur,
                )
            elif row["status"] in ("running", "pending"):
                events = [status_event("waiting")]
                if row["worker_id"] is not None:
                    # The worker keeps its fence to persist partial output, then releases the chat.
                    await self._log.write(
                        chat_id,
                        events,
                        set_sql="status = 'waiting', interrupt = 'stop'",
                        returning=NOTIFY_INTERRUPT,
                        cur=cur,
                    )
                else:
                    await self._log.write(chat_id, events, set_sql="status = 'waiting'", cur=cur)
            chat = await queries.read_chat(cur, chat_id)
        await self._log.publish(chat_id, events)
        return chat
