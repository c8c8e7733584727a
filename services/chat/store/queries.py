"""Small statements several chat operations share, run on the caller's cursor (and transaction)."""

from __future__ import annotations

from typing import Any

from agentplane.chat.v1 import chat_pb2
from psycopg import AsyncCursor

from services.chat import parts as parts_mod
from services.chat.domain import NewMessage
from services.chat.store.rows import (
    CHAT_COLUMNS,
    chat_from_row,
    chat_not_found,
    message_event,
    message_from_row,
    message_not_found,
    now,
    queued_from_row,
)


async def lock_chat(cur: AsyncCursor[Any], owner_id: str, chat_id: str) -> dict[str, Any]:
    """The owner's chat row, locked until the transaction ends; NotFound otherwise."""
    await cur.execute(
        "SELECT * FROM chat_chats WHERE id = %s AND owner_id = %s FOR UPDATE", (chat_id, owner_id)
    )
    row = await cur.fetchone()
    if row is None:
        raise chat_not_found(chat_id)
    return dict(row)


async def check_owned(cur: AsyncCursor[Any], owner_id: str, chat_id: str) -> None:
    """NotFound unless the chat exists and is the owner's."""
    await cur.execute("SELECT 1 FROM chat_chats WHERE id = %s AND owner_id = %s", (chat_id, owner_id))
    if await cur.fetchone() is None:
        raise chat_not_found(chat_id)


async def read_chat(cur: AsyncCursor[Any], chat_id: str) -> chat_pb2.Chat:
    """A chat by id (no owner check: the caller did it)."""
    await cur.execute(f"SELECT {CHAT_COLUMNS} FROM chat_chats c WHERE c.id = %s", (chat_id,))
    row = await cur.fetchone()
    if row is None:
        raise chat_not_found(chat_id)
    return chat_from_row(row)


async def read_message(cur: AsyncCursor[Any], chat_id: str, message_id: str) -> chat_pb2.Message:
    """A message of the chat, deleted by an edit or not."""
    await cur.execute("SELECT * FROM chat_messages WHERE id = %s AND chat_id = %s", (message_id, chat_id))
    row = await cur.fetchone()
    if row is None:
        raise message_not_found(chat_id, message_id)
    return message_from_row(row)


async def live_message(cur: AsyncCursor[Any], chat_id: str, message_id: str) -> dict[str, Any]:
    """The row of a message of the chat that no edit has deleted, or NotFound."""
    await cur.execute(
        "SELECT * FROM chat_messages WHERE id = %s AND chat_id = %s AND NOT deleted", (message_id, chat_id)
    )
    row: dict[str, Any] | None = await cur.fetchone()
    if row is None:
        raise message_not_found(chat_id, message_id)
    return row


async def queued(cur: AsyncCursor[Any], chat_id: str, limit: int = 100) -> list[chat_pb2.QueuedMessage]:
    """The chat's queue, next first."""
    await cur.execute(
        "SELECT * FROM chat_queued_messages WHERE chat_id = %s ORDER BY position LIMIT %s", (chat_id, limit)
    )
    return [queued_from_row(r, i + 1) for i, r in enumerate(await cur.fetchall())]


async def queue_event(cur: AsyncCursor[Any], chat_id: str) -> chat_pb2.ChatEvent:
    """A `queue_changed` event with the chat's queue as it is now."""
    return chat_pb2.ChatEvent(queue_changed=chat_pb2.QueueChanged(queued_messages=await queued(cur, chat_id)))


async def pop_front(cur: AsyncCursor[Any], chat_id: str) -> list[chat_pb2.ChatEvent]:
    """Move the front queued message into the history: its message_persisted and queue_changed
    events (none when the queue is empty), for the caller to store with its change of the row."""
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
    return [message_event(chat_id, str(q["id"]), msg, now()), await queue_event(cur, chat_id)]


async def record_request(
    cur: AsyncCursor[Any], owner_id: str, kind: str, request_id: str, chat_id: str, message_id: str | None
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
    earlier: dict[str, Any] | None = await cur.fetchone()
    return earlier
