"""WatchChats resumed from a cursor: what changed while the client was away arrives once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import psycopg
import pytest
from agentplane.chat.v1 import chat_pb2
from agentplane.chat.v1 import chat_service_pb2 as cs
from google.protobuf import field_mask_pb2

from services.chat import watch
from services.common import rpc_errors
from tests.chat.conftest import Stack, text
from tests.helpers import wait_until

BOOKMARK = chat_pb2.CHAT_CHANGE_KIND_BOOKMARK
Response = cs.WatchChatsResponse


class Watch:
    """One WatchChats call read in the background."""

    def __init__(self, stub: Any, cursor: str = "") -> None:
        self.call = stub.WatchChats(cs.WatchChatsRequest(cursor=cursor))
        self.seen: list[Response] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for change in self.call:
            self.seen.append(change)

    async def until_live(self) -> list[Response]:
        """The changes before the first bookmark (a resumed watch's replay), once it arrived."""
        await wait_until(
            lambda: self._reader.done() or any(c.kind == BOOKMARK for c in self.seen),
            what="the watch's bookmark",
        )
        if self._reader.done():
            self._reader.result()  # the call's error, when it failed
        first = next(i for i, c in enumerate(self.seen) if c.kind == BOOKMARK)
        return self.seen[:first]

    def changes(self) -> list[Response]:
        """Every change received (no bookmarks)."""
        return [c for c in self.seen if c.kind != BOOKMARK]

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._reader


async def _rename(stub: Any, chat_id: str, title: str) -> None:
    await stub.UpdateChat(
        cs.UpdateChatRequest(
            chat=chat_pb2.Chat(id=chat_id, title=title), update_mask=field_mask_pb2.FieldMask(paths=["title"])
        )
    )


async def _replay(stub: Any, cursor: str) -> list[Response]:
    resumed = Watch(stub, cursor)
    try:
        return await resumed.until_live()
    finally:
        await resumed.close()


def _summary(changes: list[Response]) -> list[tuple[str, int, str, int]]:
    return [(c.chat.id, c.kind, c.chat.title, c.chat.status) for c in changes]


async def test_resume_delivers_each_missed_change_once(stack: Stack) -> None:
    alice = stack.stub()
    chats = {}
    for name in ("renamed", "deleted", "untouched", "seen"):
        chats[name] = (await alice.CreateChat(cs.CreateChatRequest(content=text(name), title=name))).chat.id
        await stack.wait_status(chats[name], chat_pb2.CHAT_STATUS_WAITING)

    first = Watch(alice)
    try:
        assert await first.until_live() == []
        await _rename(alice, chats["seen"], "seen before the disconnect")
        await wait_until(lambda: first.changes(), what="the rename to be reported")
        assert _summary(first.changes()) == [
            (chats["seen"], chat_pb2.CHAT_CHANGE_KIND_UPSERTED, "seen before the disconnect", 3)
        ]
        cursor = first.changes()[-1].cursor
    finally:
        await first.close()

    # While no watch runs: two renames of one chat, a delete, a new chat that runs a whole turn,
    # and another user's chat.
    await _rename(alice, chats["renamed"], "once")
    await _rename(alice, chats["renamed"], "twice")
    await alice.DeleteChat(cs.DeleteChatRequest(chat_id=chats["deleted"]))
    new = (await alice.CreateChat(cs.CreateChatRequest(content=text("new"), title="new"))).chat.id
    await stack.wait_status(new, chat_pb2.CHAT_STATUS_WAITING)
    bobs = (await stack.stub("bob").CreateChat(cs.CreateChatRequest(content=text("bob's")))).chat.id

    resumed = Watch(alice, cursor)
    try:
        replay = await resumed.until_live()
        waiting = chat_pb2.CHAT_STATUS_WAITING
        # Each changed chat once, in its state now; nothing seen before; nothing of bob's.
        assert sorted(_summary(replay)) == sorted(
            [
                (chats["renamed"], chat_pb2.CHAT_CHANGE_KIND_UPSERTED, "twice", waiting),
                (chats["deleted"], chat_pb2.CHAT_CHANGE_KIND_DELETED, "", 0),
                (new, chat_pb2.CHAT_CHANGE_KIND_UPSERTED, "new", waiting),
            ]
        )
        assert bobs not in [c.chat.id for c in replay]
        # Then it is live: the next change comes once, after the bookmark.
        await _rename(alice, chats["untouched"], "live")
        await wait_until(lambda: len(resumed.changes()) == 4, what="the live rename")
        assert _summary(resumed.changes()[3:]) == [
            (chats["untouched"], chat_pb2.CHAT_CHANGE_KIND_UPSERTED, "live", waiting)
        ]
        live_cursor = resumed.changes()[-1].cursor
    finally:
        await resumed.close()

    # Every response's cursor resumes right after it: from the first replayed one, the other two
    # and the live one follow, and nothing else.
    rest = await _replay(alice, replay[0].cursor)
    assert _summary(rest) == _summary(replay[1:]) + _summary(resumed.changes()[3:])
    # Nested: from the first of those, the rest of them.
    assert _summary(await _replay(alice, rest[0].cursor)) == _summary(rest[1:])
    assert await _replay(alice, live_cursor) == []


async def test_cursors_are_checked(stack: Stack) -> None:
    alice = stack.stub()

    async def refused(cursor: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _replay(alice, cursor)
        return err.value

    for bad in ("garbage", watch.Cursor.at("5:1:", time.time()).encode(), "e30="):
        err = await refused(bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert (rpc_errors.error_info(err) or ("", {}))[1].get("field") == "cursor"
    old = watch.Cursor.at("1:1:", time.time() - watch.CURSOR_MAX_AGE_SECONDS - 60).encode()
    err = await refused(old)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (rpc_errors.error_info(err) or ("", {}))[0] == "WATCH_CURSOR_EXPIRED"


async def test_a_change_that_commits_late_is_not_skipped(stack: Stack) -> None:
    """The cursor follows commit order: a change whose transaction began (and stamped its time)
    before one the client already received, but committed after it, still arrives on resume."""
    alice = stack.stub()
    early, later = [
        (await alice.CreateChat(cs.CreateChatRequest(content=text(t), title=t))).chat.id
        for t in ("early", "later")
    ]
    for chat_id in (early, later):
        await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    first = Watch(alice)
    try:
        await first.until_live()
        async with await psycopg.AsyncConnection.connect(stack.settings.require_database_url()) as conn:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE chat_chats SET title = 'committed late', updated_at = now() WHERE id = %s",
                    (early,),
                )
                # Meanwhile another change commits and is delivered, with its cursor.
                await _rename(alice, later, "committed first")
                await wait_until(lambda: first.changes(), what="the other rename")
                cursor = first.changes()[-1].cursor
            # The early transaction commits now, after the cursor was handed out.
    finally:
        await first.close()
    replay = await _replay(alice, cursor)
    assert [(c.chat.id, c.chat.title) for c in replay] == [(early, "committed late")]
