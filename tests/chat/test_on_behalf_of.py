"""Issue 11: a service acting for user X reaches only X's chats, usage and workspaces.

Every ChatService RPC works on the effective user (`auth.require_user_id`): a service acting for
alice is alice. Bob's chats are NOT_FOUND to it (as they are to alice), ListChats and WatchChats
show only alice's, GetUsage naming bob is PERMISSION_DENIED (only admins may name another user),
and CreateChat cannot attach bob's workspace (toolexec, asked on alice's behalf, says NOT_FOUND:
NOT_FOUND WORKSPACE_NOT_FOUND). A service acting for nobody is nobody here (USER_REQUIRED).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from agentplane.chat.v1 import chat_pb2
from agentplane.chat.v1 import chat_service_pb2 as cs
from google.protobuf import field_mask_pb2

from services.common import auth, rpc_errors
from tests.chat.conftest import Stack, text, until_watch_is_live
from tests.helpers import wait_until

FOR_ALICE = [(auth.ON_BEHALF_OF_METADATA_KEY, "alice")]
MISSING = str(uuid.uuid4())


async def _fails(call: Any, code: grpc.StatusCode, reason: str | None = None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    if reason is not None:
        info = rpc_errors.error_info(err.value)
        assert info is not None and info[0] == reason, (info, err.value.details())
    return err.value


async def _bobs_chat(stack: Stack) -> tuple[chat_pb2.Chat, chat_pb2.Message]:
    created = await stack.stub("bob").CreateChat(cs.CreateChatRequest(content=text("bob's secret")))
    await stack.wait_status(created.chat.id, chat_pb2.CHAT_STATUS_WAITING, user="bob")
    return created.chat, created.message


async def _first_stream_event(call: Any) -> None:
    try:
        async with asyncio.timeout(10):
            async for _ in call:
                return
    finally:
        call.cancel()


async def test_service_acting_for_alice_cannot_reach_bobs_chats(stack: Stack) -> None:
    chat, message = await _bobs_chat(stack)
    bobs_messages = [m.id for m in await stack.messages(chat.id, user="bob")]
    svc = stack.stub("service:chat", role="service")
    nf = grpc.StatusCode.NOT_FOUND
    calls: list[Any] = [
        svc.GetChat(cs.GetChatRequest(chat_id=chat.id), metadata=FOR_ALICE),
        svc.UpdateChat(
            cs.UpdateChatRequest(
                chat=chat_pb2.Chat(id=chat.id, title="mine"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=FOR_ALICE,
        ),
        svc.SendMessage(cs.SendMessageRequest(chat_id=chat.id, content=text("x")), metadata=FOR_ALICE),
        svc.EditMessage(
            cs.EditMessageRequest(chat_id=chat.id, message_id=message.id, content=text("x")),
            metadata=FOR_ALICE,
        ),
        svc.ListMessages(cs.ListMessagesRequest(chat_id=chat.id), metadata=FOR_ALICE),
        svc.ListQueuedMessages(cs.ListQueuedMessagesRequest(chat_id=chat.id), metadata=FOR_ALICE),
        svc.PromoteQueuedMessage(
            cs.PromoteQueuedMessageRequest(chat_id=chat.id, queued_message_id=MISSING), metadata=FOR_ALICE
        ),
        svc.InterruptChat(cs.InterruptChatRequest(chat_id=chat.id), metadata=FOR_ALICE),
        svc.ForkChat(cs.ForkChatRequest(chat_id=chat.id), metadata=FOR_ALICE),
        svc.CompactChat(cs.CompactChatRequest(chat_id=chat.id), metadata=FOR_ALICE),
    ]
    for call in calls:
        await _fails(call, nf, "CHAT_NOT_FOUND")
    # Deletes are idempotent: for alice, bob's chat is gone, so deleting it (or a message of its
    # queue) succeeds, and leaves it alone.
    await svc.DeleteQueuedMessage(
        cs.DeleteQueuedMessageRequest(chat_id=chat.id, queued_message_id=MISSING), metadata=FOR_ALICE
    )
    await svc.DeleteChat(cs.DeleteChatRequest(chat_id=chat.id), metadata=FOR_ALICE)
    assert (await stack.stub("bob").GetChat(cs.GetChatRequest(chat_id=chat.id))).chat.id == chat.id
    await _fails(
        _first_stream_event(svc.StreamChat(cs.StreamChatRequest(chat_id=chat.id), metadata=FOR_ALICE)),
        nf,
        "CHAT_NOT_FOUND",
    )
    listed = await svc.ListChats(cs.ListChatsRequest(), metadata=FOR_ALICE)
    assert chat.id not in [c.id for c in listed.chats]
    await _fails(
        svc.GetUsage(cs.GetUsageRequest(user_id="bob"), metadata=FOR_ALICE),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    # Bob's workspace cannot be attached to a chat made for alice.
    bobs_ws = await stack.workspace("bob")
    err = await _fails(
        svc.CreateChat(cs.CreateChatRequest(content=text("x"), workspace_id=bobs_ws), metadata=FOR_ALICE),
        grpc.StatusCode.NOT_FOUND,
        "WORKSPACE_NOT_FOUND",
    )
    assert bobs_ws in (err.details() or "")
    # Bob's chat is untouched.
    same = await stack.chat_of(chat.id, user="bob")
    assert same.title == chat.title and not same.archived
    assert [m.id for m in await stack.messages(chat.id, user="bob")] == bobs_messages
    assert bobs_messages[0] == message.id


async def test_service_acting_for_alice_works_on_alices_chats(stack: Stack) -> None:
    await _bobs_chat(stack)
    svc = stack.stub("service:chat", role="service")
    ws = await stack.workspace("alice")
    created = await svc.CreateChat(
        cs.CreateChatRequest(content=text("for alice"), workspace_id=ws), metadata=FOR_ALICE
    )
    assert created.chat.owner_id == "alice" and created.chat.workspace_id == ws
    await stack.wait_status(created.chat.id, chat_pb2.CHAT_STATUS_WAITING)
    got = await svc.GetChat(cs.GetChatRequest(chat_id=created.chat.id), metadata=FOR_ALICE)
    assert got.chat.id == created.chat.id
    listed = await svc.ListChats(cs.ListChatsRequest(), metadata=FOR_ALICE)
    assert [c.id for c in listed.chats] == [created.chat.id]
    assert [c.id for c in (await stack.stub("alice").ListChats(cs.ListChatsRequest())).chats] == [
        created.chat.id
    ]
    implied = await svc.GetUsage(cs.GetUsageRequest(), metadata=FOR_ALICE)
    named = await svc.GetUsage(cs.GetUsageRequest(user_id="alice"), metadata=FOR_ALICE)
    assert implied == named and implied.chats == 1


async def test_admin_reads_bobs_usage(stack: Stack) -> None:
    await _bobs_chat(stack)
    admin = stack.stub("admin", role="admin")
    bobs = await admin.GetUsage(cs.GetUsageRequest(user_id="bob"))
    assert bobs.chats == 1 and bobs.usage.output_tokens > 0
    assert bobs == await stack.stub("bob").GetUsage(cs.GetUsageRequest())


async def test_service_acting_for_nobody_is_nobody(stack: Stack) -> None:
    chat, _ = await _bobs_chat(stack)
    svc = stack.stub("service:chat", role="service")
    denied = grpc.StatusCode.PERMISSION_DENIED
    await _fails(svc.ListChats(cs.ListChatsRequest()), denied, "USER_REQUIRED")
    await _fails(svc.GetChat(cs.GetChatRequest(chat_id=chat.id)), denied, "USER_REQUIRED")
    await _fails(svc.GetUsage(cs.GetUsageRequest(user_id="bob")), denied, "USER_REQUIRED")


async def test_watch_acting_for_alice_sees_only_alices_chats(stack: Stack) -> None:
    svc = stack.stub("service:chat", role="service")
    watch = svc.WatchChats(cs.WatchChatsRequest(), metadata=FOR_ALICE)
    seen: list[cs.WatchChatsResponse] = []

    async def read() -> None:
        async for change in watch:
            seen.append(change)

    reader = asyncio.create_task(read())
    try:
        probe = await until_watch_is_live(stack, seen, "alice")
        bobs = await stack.stub("bob").CreateChat(cs.CreateChatRequest(content=text("bob's")))
        mine = await stack.stub("alice").CreateChat(cs.CreateChatRequest(content=text("alice's")))
        await stack.wait_status(mine.chat.id, chat_pb2.CHAT_STATUS_WAITING)
        await stack.wait_status(bobs.chat.id, chat_pb2.CHAT_STATUS_WAITING, user="bob")
        await wait_until(
            lambda: any(
                c.chat.id == mine.chat.id and c.chat.status == chat_pb2.CHAT_STATUS_WAITING for c in seen
            ),
            what="the watch acting for alice to report her chat WAITING",
        )
        changes = [c for c in seen if c.kind != chat_pb2.CHAT_CHANGE_KIND_BOOKMARK]
        assert {c.chat.id for c in changes} == {probe, mine.chat.id}
    finally:
        watch.cancel()
        reader.cancel()
        with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
            await reader
