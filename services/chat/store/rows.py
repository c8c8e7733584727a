"""Mapping between the chat tables' rows and the API's protobuf messages; no SQL here.

Also the events every part of the store builds (a persisted message, a status change), the
opaque page tokens and the errors for things the caller cannot see.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any

from agentplane.chat.v1 import chat_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from services.chat import parts as parts_mod
from services.chat.domain import NewMessage, RunInfo
from services.common.errors import InvalidArgument, NotFound

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
PB_TO_ROLE = {v: k for k, v in ROLE_TO_PB.items()}
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_micros",
)
# The select list of a Chat: the row plus its queue's length.
CHAT_COLUMNS = """
    c.*, (SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = c.id) AS queued_count
"""


def now() -> dt.datetime:
    """The current UTC time."""
    return dt.datetime.now(dt.UTC)


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of `value`."""
    out = timestamp_pb2.Timestamp()
    if value is not None:
        out.FromDatetime(value)
    return out


def _duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 10**6)


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
        runtime=_duration(row["runtime_ms"]),
        sender_id=row["sender_id"],
        seq=int(row["seq"]),
        create_time=ts(row["created_at"]),
    )


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


def run_info_from_row(chat_id: str, row: dict[str, Any]) -> RunInfo:
    """What a run needs to know, from a chat_chats row (or a RETURNING with those columns)."""
    return RunInfo(
        chat_id,
        row["owner_id"],
        row["model_config_id"],
        row["workspace_id"],
        row["agents_md"],
        row.get("streaming_message_id"),
    )


def message_event(chat_id: str, message_id: str, msg: NewMessage, when: dt.datetime) -> chat_pb2.ChatEvent:
    """The `message_persisted` event of a new message (the event log stores the message from it)."""
    return chat_pb2.ChatEvent(
        message_persisted=chat_pb2.Message(
            id=message_id,
            chat_id=chat_id,
            role=ROLE_TO_PB[msg.role],
            parts=list(msg.parts),
            visibility=msg.visibility,  # type: ignore[arg-type]
            usage=msg.usage or chat_pb2.Usage(),
            model_config_id=msg.model_config_id,
            runtime=_duration(msg.runtime_ms),
            sender_id=msg.sender_id,
            create_time=ts(when),
        )
    )


def status_event(status: str, reason: str = "", message: str = "") -> chat_pb2.ChatEvent:
    """A `status_changed` event; `reason` and `message` describe an error."""
    ev = chat_pb2.ChatEvent(status_changed=chat_pb2.StatusChanged(status=STATUS_TO_PB[status]))
    if reason:
        ev.status_changed.error.CopyFrom(chat_pb2.ChatError(reason=reason, message=message, time=ts(now())))
    return ev


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
        raise bad_token(field) from None


def bad_token(field: str) -> InvalidArgument:
    """The error for a page token whose data is not what this list wrote."""
    return InvalidArgument(field, "is not a token returned by a previous call")


def chat_not_found(chat_id: str) -> NotFound:
    """The NOT_FOUND error for a chat the caller cannot see."""
    return NotFound(f"chat {chat_id} not found", reason="CHAT_NOT_FOUND", metadata={"chat_id": chat_id})


def message_not_found(chat_id: str, message_id: str) -> NotFound:
    """The NOT_FOUND error for a message that is not (or no longer) in the chat's history."""
    return NotFound(
        f"message {message_id} not found in chat {chat_id}",
        reason="MESSAGE_NOT_FOUND",
        metadata={"message_id": message_id},
    )


def queued_not_found(chat_id: str, queued_id: str) -> NotFound:
    """The NOT_FOUND error for a queued message that is not in the chat's queue."""
    return NotFound(
        f"queued message {queued_id} not found in chat {chat_id}",
        reason="QUEUED_MESSAGE_NOT_FOUND",
        metadata={"queued_message_id": queued_id},
    )
