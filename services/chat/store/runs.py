"""The writes of a run (the `Store` protocol of services/chat/loop.py), each fenced.

Every write has ``worker_id = $w AND generation = $g`` on the chat row: when the fence no
longer matches (a sweep, an edit or a delete took the chat), `LeaseLost` is raised and
nothing is written. The common writes are one self-committing statement each.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Sequence
from typing import Any

from agentplane.chat.v1 import chat_pb2

from services.chat import parts as parts_mod
from services.chat.domain import Fence, LeaseLost, NewMessage, RunInfo, StartedRun
from services.chat.store import queries
from services.chat.store.channels import NOTIFY_WATCH
from services.chat.store.eventlog import N, Part, log_ctes, lost, number
from services.chat.store.rows import (
    USAGE_FIELDS,
    chat_not_found,
    message_event,
    message_from_row,
    now,
    queued_from_row,
    run_info_from_row,
    status_event,
    ts,
)
from services.common.errors import FailedPrecondition


class Runs(Part):
    """start_run, history, emit, persist, finish_turn, fail_run and run_info."""

    async def start_run(self, chat_id: str, fence: Fence) -> StartedRun:
        """Announce RUNNING; deliver the front queued message when an interrupt asked to resume.

        `turn_began` is taken right after the commit, before anything is published: from then on
        the chat's interrupt flag is clear, so the caller can start honouring new interrupts.
        """
        # Common case (no interrupt asking to resume): one statement; None when it is not that.
        events = [status_event("running")]
        row = await self._log.write(
            chat_id,
            events,
            fence=fence,
            set_sql="interrupt = NULL",
            where_sql="interrupt IS DISTINCT FROM 'resume'",
            returning="owner_id, model_config_id, workspace_id, agents_md, streaming_message_id",
        )
        if row is None:
            events, row = await self._start_with_delivery(chat_id, fence)
        began = time.monotonic()
        await self._log.publish(chat_id, events)
        return StartedRun(run_info_from_row(chat_id, row), began)

    async def _start_with_delivery(
        self, chat_id: str, fence: Fence
    ) -> tuple[list[chat_pb2.ChatEvent], dict[str, Any]]:
        """`start_run` of a chat whose interrupt may ask to resume (or whose fence is lost)."""
        events: list[chat_pb2.ChatEvent] = []
        async with self._log.tx() as cur:
            await cur.execute(
                "SELECT * FROM chat_chats WHERE id = %s AND worker_id = %s AND generation = %s FOR UPDATE",
                (chat_id, fence.worker_id, fence.generation),
            )
            row = await cur.fetchone()
            if row is None:
                raise LeaseLost(chat_id)
            if row["interrupt"] == "resume":
                events += await queries.pop_front(cur, chat_id)
            events.append(status_event("running"))
            await self._log.write(chat_id, events, fence=fence, set_sql="interrupt = NULL", cur=cur)
        return events, dict(row)

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
        await self._log.emit(chat_id, fence, events)

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

        One statement: chat row, message and events. `pre_events` (last deltas, last tool result
        announcement) come just before the message. `guard_idle` (CompactChat outside a run)
        requires that no worker owns the chat. `agents_md`, when given, is cached on the chat row.
        The message's deltas are no longer a reply in flight (`streaming_message_id`).
        """
        message_id = message_id or str(uuid.uuid4())
        usage = msg.usage or chat_pb2.Usage()
        events = [*pre_events, message_event(chat_id, message_id, msg, now()), *extra_events]
        sets = ", ".join(f"{f} = {f} + %({f})s" for f in USAGE_FIELDS)
        sets += ", streaming_message_id = NULLIF(streaming_message_id, %(message_id)s)"
        params: dict[str, Any] = {f: getattr(usage, f) for f in USAGE_FIELDS}
        params["message_id"] = message_id
        if agents_md is not None:
            sets += ", agents_md = %(agents_md)s"
            params["agents_md"] = agents_md
        row = await self._log.write(
            chat_id,
            events,
            fence=fence,
            set_sql=sets,
            where_sql="worker_id IS NULL AND status <> 'pending'" if guard_idle else "",
            params=params,
        )
        if row is None:
            if guard_idle:
                raise FailedPrecondition(
                    f"chat {chat_id} started running; compact it when it is idle", reason="CHAT_BUSY"
                )
            raise lost(chat_id, fence)
        await self._log.publish(chat_id, events)
        return events[len(pre_events)].message_persisted

    async def discard_reply(
        self,
        chat_id: str,
        fence: Fence,
        message_id: str,
        *,
        reason: str,
        retrying: bool,
        then: Sequence[chat_pb2.ChatEvent] = (),
    ) -> None:
        """Announce that the reply streamed as deltas of `message_id` will never be persisted
        (a durable `reply_discarded` event), followed by `then` (a retry notice), in one statement.

        Only runs on failure paths (a broken provider stream, a run finding an abandoned reply),
        never per step.
        """
        discarded = chat_pb2.ReplyDiscarded(message_id=message_id, reason=reason, retrying=retrying)
        events = [chat_pb2.ChatEvent(reply_discarded=discarded), *then]
        row = await self._log.write(
            chat_id,
            events,
            fence=fence,
            set_sql="streaming_message_id = NULLIF(streaming_message_id, %(discarded)s)",
            params={"discarded": message_id},
            notify=False,
            touch=False,
        )
        if row is None:
            raise LeaseLost(chat_id)
        await self._log.publish(chat_id, events)

    async def finish_turn(self, chat_id: str, fence: Fence) -> float | None:
        """End a turn: deliver the next queued message (keep running) or wait for the user (None).

        Usually one statement. It reads the queue and the chat row's `last_seq` in its snapshot
        and releases the chat only if the fenced row it then locks still has that `last_seq`:
        every queue change bumps `last_seq` under the row lock, so a message queued at the same
        moment either makes the release miss (and we look again) or is stored after it (and the
        sender sees an idle chat and makes it PENDING) -- it is never stranded. A non-empty queue
        takes a second statement that pops its front under the same check; the answer is then
        when that next turn's start was committed (as `start_run`'s `turn_began`).
        """
        waiting = status_event("waiting")
        # After a 'stop' interrupt the chat already announced WAITING: the release takes no seq.
        log, p = log_ctes(chat_id, [waiting], only_if="c.last_seq > (SELECT last_seq FROM s)")
        p.update(id=chat_id, w=fence.worker_id, g=fence.generation)
        # Loops only when a concurrent change (a send, an interrupt, a queue edit) committed
        # between the statement's snapshot and its row lock; each attempt takes a new snapshot.
        while True:
            async with self._log.stmt() as cur:
                await cur.execute(
                    "WITH s AS (SELECT last_seq, interrupt FROM chat_chats"
                    " WHERE id = %(id)s AND worker_id = %(w)s AND generation = %(g)s),"
                    " q AS (SELECT id, parts, sender_id, created_at, position FROM chat_queued_messages"
                    " WHERE chat_id = %(id)s ORDER BY position LIMIT 100),"
                    " c AS (UPDATE chat_chats SET"
                    f" last_seq = last_seq + CASE WHEN interrupt = 'stop' THEN 0 ELSE {N} END,"
                    " status = 'waiting', worker_id = NULL, lease_expires_at = NULL, interrupt = NULL,"
                    " updated_at = now()"
                    " WHERE id = %(id)s AND worker_id = %(w)s AND generation = %(g)s"
                    " AND last_seq = (SELECT last_seq FROM s)"
                    " AND (interrupt = 'stop' OR NOT EXISTS (SELECT 1 FROM q))"
                    f" RETURNING id, last_seq, {NOTIFY_WATCH}){log}"
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
                    number([waiting], int(row["new_seq"]))
                    events.append(waiting)
                await self._log.publish(chat_id, events)
                return None
            queue = row["queue"] or []
            if queue and row["snap_interrupt"] != "stop":
                began = await self._deliver_next(chat_id, fence, snap_seq, queue)
                if began is not None:
                    return began

    async def _deliver_next(
        self,
        chat_id: str,
        fence: Fence,
        expected_seq: int,
        queue: list[dict[str, Any]],
    ) -> float | None:
        """Move the front of `queue` (read at `expected_seq`) into the history, in one statement;
        when that committed.

        None (nothing written) when the chat row changed since that read: the caller looks again.
        """
        for q in queue:
            q["chat_id"] = chat_id
            q["created_at"] = dt.datetime.fromisoformat(q["created_at"])
        front, rest = queue[0], queue[1:]
        msg = NewMessage(role="user", parts=parts_mod.from_json(front["parts"]), sender_id=front["sender_id"])
        when = now()
        # The queued message keeps its id, so an idempotent SendMessage finds it in the history.
        events = [
            message_event(chat_id, str(front["id"]), msg, when),
            chat_pb2.ChatEvent(
                queue_changed=chat_pb2.QueueChanged(
                    queued_messages=[queued_from_row(r, i + 1) for i, r in enumerate(rest)]
                )
            ),
        ]
        log, p = log_ctes(chat_id, events, when=when)
        p.update(id=chat_id, w=fence.worker_id, g=fence.generation)
        p.update(expected=expected_seq, q_id=str(front["id"]))
        async with self._log.stmt() as cur:
            await cur.execute(
                f"WITH c AS (UPDATE chat_chats SET last_seq = last_seq + {N}, status = 'running',"
                " interrupt = NULL, updated_at = now()"
                " WHERE id = %(id)s AND worker_id = %(w)s AND generation = %(g)s AND last_seq = %(expected)s"
                " AND interrupt IS DISTINCT FROM 'stop'"
                f" RETURNING id, last_seq, {NOTIFY_WATCH}),"
                # Only when the row still matched: the queue is then exactly what we read.
                " popped AS (DELETE FROM chat_queued_messages WHERE id = %(q_id)s AND chat_id = %(id)s"
                f" AND EXISTS (SELECT 1 FROM c) RETURNING id){log}"
                " SELECT c.last_seq FROM c",
                p,
            )
            row = await cur.fetchone()
        if row is None:
            return None
        number(events, int(row["last_seq"]))
        began = time.monotonic()
        await self._log.publish(chat_id, events)
        return began

    async def fail_run(self, chat_id: str, fence: Fence, reason: str, message: str) -> None:
        """End a run in ERROR with last_error (one statement)."""
        events = [
            chat_pb2.ChatEvent(error=chat_pb2.ChatError(reason=reason, message=message, time=ts(now()))),
            status_event("error", reason, message),
        ]
        row = await self._log.write(
            chat_id,
            events,
            fence=fence,
            set_sql="status = 'error', worker_id = NULL, lease_expires_at = NULL, interrupt = NULL,"
            " last_error_reason = %(r)s, last_error_message = %(m)s, last_error_time = now()",
            params={"r": reason, "m": message},
        )
        if row is None:
            raise LeaseLost(chat_id)
        await self._log.publish(chat_id, events)

    async def run_info(self, chat_id: str) -> RunInfo:
        """Chat facts for a run outside a worker (CompactChat)."""
        async with self._pool.connection() as conn, conn.cursor() as cur:
            await cur.execute("SELECT * FROM chat_chats WHERE id = %s", (chat_id,))
            row = await cur.fetchone()
        if row is None:
            raise chat_not_found(chat_id)
        return run_info_from_row(chat_id, row)
