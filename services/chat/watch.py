"""WatchChats cursors: where a chat-list watch stands, so a reconnecting client misses nothing.

A cursor names a Postgres snapshot (``pg_snapshot``: ``xmin:xmax:xip,...``). Each chat row
records the transaction that last changed what a Chat shows (``watch_xid``, set by a trigger) and
each deletion leaves a tombstone with its transaction (migration 0003_watch_cursor). A change was
delivered exactly when its transaction is visible in the cursor's snapshot: visibility follows
commit order, so unlike a timestamp or a sequence (taken before the commit) it cannot skip a
transaction that committed late.

The watch reads every owed change in one statement (one snapshot S1), sorted by chat id, and
gives each response the cursor that covers it and everything before it. Two kinds of change are
owed after a cursor (s, previous, after_id):

- new: not visible in s. While they are delivered, the cursor is (S1, previous=s, after_id=the
  chat just delivered): whatever S1 sees but s did not, on chats above that id, is still owed.
- carried over (only when resuming from a cursor with `previous`): visible in s but not in
  `previous`, on chats above `after_id`, the rest of the batch an earlier watch was delivering
  when the client went away. They come first, with cursors (s, previous, their id).

The last response of a batch gets (S1). A change seen twice in one batch's window (a chat
renamed twice while the client was away) is one response with the chat's current state.

Tombstones are kept for 8 days; a cursor older than 7 is refused (WATCH_CURSOR_EXPIRED).
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.chat.store.chats import WatchBatch, WatchChange, WatchPosition
from services.common.errors import FailedPrecondition, InvalidArgument

# How long a cursor may be resumed from (the tombstones of deleted chats live a day longer).
CURSOR_MAX_AGE_SECONDS = 7 * 24 * 3600
# A snapshot's in-progress list is bounded by the database's connections; this bounds what a
# client may send us.
MAX_IN_PROGRESS = 10_000
MAX_CURSOR_CHARS = 200_000
_XID = r"[1-9][0-9]{0,18}"
_SNAPSHOT_RE = re.compile(rf"^({_XID}):({_XID}):((?:{_XID})(?:,{_XID})*)?$")
_VERSION = 1


@dataclass(frozen=True)
class Cursor:
    """A watch position and when its oldest snapshot was taken (unix seconds)."""

    position: WatchPosition
    taken_at: float
    previous_taken_at: float | None = None

    @classmethod
    def at(cls, snapshot: str, taken_at: float) -> Cursor:
        """Everything `snapshot` sees was delivered; nothing else."""
        return cls(WatchPosition(snapshot), taken_at)

    @property
    def oldest(self) -> float:
        """When the oldest snapshot the cursor names was taken."""
        if self.previous_taken_at is None:
            return self.taken_at
        return min(self.taken_at, self.previous_taken_at)

    def encode(self) -> str:
        """The opaque token clients send back."""
        data: dict[str, Any] = {"v": _VERSION, "s": self.position.snapshot, "t": int(self.taken_at)}
        if self.position.previous is not None:
            data["p"] = self.position.previous
            data["pt"] = int(self.previous_taken_at or self.taken_at)
            data["a"] = self.position.after_id
        return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def _bad() -> InvalidArgument:
    return InvalidArgument("cursor", "is not a cursor returned by WatchChats; watch again without one")


def _snapshot(value: Any) -> str:
    """A ``pg_snapshot`` text the database will accept (checked here: its error would be INTERNAL)."""
    if not isinstance(value, str):
        raise _bad()
    m = _SNAPSHOT_RE.match(value)
    if m is None:
        raise _bad()
    xmin, xmax = int(m.group(1)), int(m.group(2))
    xip = [int(x) for x in m.group(3).split(",")] if m.group(3) else []
    if xmin > xmax or len(xip) > MAX_IN_PROGRESS:
        raise _bad()
    if any(not xmin <= x < xmax for x in xip) or xip != sorted(set(xip)):
        raise _bad()
    return value


def decode(token: str, *, now: float | None = None) -> Cursor:
    """The cursor a client sent; InvalidArgument when it is not one of ours, FailedPrecondition
    (WATCH_CURSOR_EXPIRED) when it is too old to resume from."""
    if len(token) > MAX_CURSOR_CHARS:
        raise _bad()
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeError):
        raise _bad() from None
    if not isinstance(data, dict) or data.get("v") != _VERSION:
        raise _bad()
    taken_at = data.get("t")
    if not isinstance(taken_at, int) or isinstance(taken_at, bool) or taken_at < 0:
        raise _bad()
    snapshot = _snapshot(data.get("s"))
    cursor = Cursor(WatchPosition(snapshot), float(taken_at))
    if "p" in data:
        previous_at, after_id = data.get("pt"), data.get("a")
        if not isinstance(previous_at, int) or isinstance(previous_at, bool) or previous_at < 0:
            raise _bad()
        if not isinstance(after_id, str):
            raise _bad()
        try:
            after_id = str(uuid.UUID(after_id))
        except ValueError:
            raise _bad() from None
        position = WatchPosition(snapshot, _snapshot(data["p"]), after_id)
        cursor = Cursor(position, float(taken_at), float(previous_at))
    age = (time.time() if now is None else now) - cursor.oldest
    if age > CURSOR_MAX_AGE_SECONDS:
        raise FailedPrecondition(
            f"the watch cursor is {age / 86400:.1f} days old; cursors can be resumed for "
            f"{CURSOR_MAX_AGE_SECONDS // 86400} days. List the chats (ListChats) and watch again "
            "without a cursor",
            reason="WATCH_CURSOR_EXPIRED",
        )
    return cursor


def responses(
    since: Cursor, batch: WatchBatch, taken_at: float
) -> tuple[list[chat_service_pb2.WatchChatsResponse], Cursor]:
    """The responses for the changes `batch` read after `since` (at `taken_at`), each with its
    cursor, and the cursor after the batch (see the module docstring)."""
    carried = sorted((c for c in batch.changes if c.owed_before), key=lambda c: c.chat_id)
    new = sorted((c for c in batch.changes if not c.owed_before), key=lambda c: c.chat_id)
    after = Cursor.at(batch.snapshot, taken_at)
    out: list[chat_service_pb2.WatchChatsResponse] = []
    for c in carried:
        pos = since.position
        out.append(_response(c, Cursor(WatchPosition(pos.snapshot, pos.previous, c.chat_id), *_times(since))))
    for c in new:
        cursor = Cursor(
            WatchPosition(batch.snapshot, since.position.snapshot, c.chat_id), taken_at, since.taken_at
        )
        out.append(_response(c, cursor))
    if out:
        out[-1].cursor = after.encode()
    return out, after


def _times(cursor: Cursor) -> tuple[float, float | None]:
    return cursor.taken_at, cursor.previous_taken_at


def _response(change: WatchChange, cursor: Cursor) -> chat_service_pb2.WatchChatsResponse:
    if change.chat is None:
        return chat_service_pb2.WatchChatsResponse(
            kind=chat_pb2.CHAT_CHANGE_KIND_DELETED,
            chat=chat_pb2.Chat(id=change.chat_id),
            cursor=cursor.encode(),
        )
    return chat_service_pb2.WatchChatsResponse(
        kind=chat_pb2.CHAT_CHANGE_KIND_UPSERTED, chat=change.chat, cursor=cursor.encode()
    )


def bookmark(cursor: Cursor) -> chat_service_pb2.WatchChatsResponse:
    """A response that only says where the watch stands (sent when it goes live)."""
    return chat_service_pb2.WatchChatsResponse(
        kind=chat_pb2.CHAT_CHANGE_KIND_BOOKMARK, cursor=cursor.encode()
    )
