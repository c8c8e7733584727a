"""Chat state in Postgres: one short statement (or transaction) per state change.

`ChatStore` is what the rest of the service uses; it is made of parts, one module each:

| module | job |
|---|---|
| `rows` | rows <-> protobuf messages, page tokens, `parse_uuid`, status and role maps, errors |
| `eventlog` | `EventLog`: the one writer of changes (seqs, messages, durable events) |
| `chats` | `Chats`: create, get, list, update, delete, fork, usage, event replay, watches, request keys |
| `messages` | `Messages`: send (the busy/idle rule), edit, queue, interrupt |
| `leases` | `Leases`: claim, renew, sweep, release |
| `runs` | `Runs`: the fenced writes of a run (the loop's `Store` protocol) |
| `queries` | small statements the operations share on one cursor |
| `channels` | the NOTIFY channels |
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from services.chat.deltas import EventNumberer
from services.chat.store.channels import INTERRUPT_CHANNEL, PENDING_CHANNEL, WATCH_CHANNEL
from services.chat.store.chats import Chats
from services.chat.store.eventlog import EventLog, Publisher
from services.chat.store.leases import Leases
from services.chat.store.messages import Messages
from services.chat.store.rows import PB_TO_STATUS, STATUS_TO_PB, chat_not_found, parse_uuid
from services.chat.store.runs import Runs

__all__ = [
    "INTERRUPT_CHANNEL",
    "PB_TO_STATUS",
    "PENDING_CHANNEL",
    "STATUS_TO_PB",
    "WATCH_CHANNEL",
    "ChatStore",
    "Publisher",
    "chat_not_found",
    "parse_uuid",
]


class ChatStore(Chats, Messages, Leases, Runs):
    """All SQL of the chat service: the parts above over one pool and one event log."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        publish: Publisher,
        *,
        numberer: EventNumberer,
        max_queued: int = 20,
        service_sender: str = "service:chat",
    ) -> None:
        super().__init__(EventLog(pool, publish, numberer))
        self.max_queued = max_queued
        self.service_sender = service_sender
