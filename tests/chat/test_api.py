"""Every RPC's validation, owner isolation, and the management RPCs, against the real stack."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from agentplane.chat.v1 import chat_pb2
from agentplane.chat.v1 import chat_service_pb2 as cs
from google.protobuf import field_mask_pb2, timestamp_pb2

from services.common import rpc_errors
from services.simulator.script import Script
from tests.chat.conftest import Stack, text
from tests.helpers import wait_until

MISSING = str(uuid.uuid4())


async def _fails(call: Any, code: grpc.StatusCode, *needles: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    for needle in needles:
        assert needle in (err.value.details() or ""), err.value.details()
    return err.value


async def test_invalid_requests(stack: Stack) -> None:
    stub = stack.stub()
    chat = (await stub.CreateChat(cs.CreateChatRequest(content=text("hi")))).chat
    bad = grpc.StatusCode.INVALID_ARGUMENT
    # Content errors are worded for people, without the field name: tests/chat/test_user_facing_errors.py.
    cases: list[tuple[Any, str]] = [
        (stub.CreateChat(cs.CreateChatRequest(content=text("x"), title="t" * 201)), "title"),
        (stub.CreateChat(cs.CreateChatRequest(content=text("x"), request_id="r" * 201)), "request_id"),
        (
            stub.CreateChat(cs.CreateChatRequest(content=text("x"), model_config_id=MISSING)),
            "model_config_id",
        ),
        # A UUID is not a workspace id (ws_ + 20 hex): malformed, so INVALID_ARGUMENT, not NOT_FOUND.
        (stub.CreateChat(cs.CreateChatRequest(content=text("x"), workspace_id=MISSING)), "workspace_id"),
        (stub.GetChat(cs.GetChatRequest()), "chat_id"),
        (stub.GetChat(cs.GetChatRequest(chat_id="nope")), "chat_id"),
        (stub.ListChats(cs.ListChatsRequest(page_size=-1)), "page_size"),
        (stub.ListChats(cs.ListChatsRequest(page_token="garbage!")), "page_token"),
        (stub.ListChats(cs.ListChatsRequest(status=99)), "status"),  # type: ignore[arg-type]
        (stub.UpdateChat(cs.UpdateChatRequest(chat=chat_pb2.Chat(id=chat.id))), "update_mask"),
        (
            stub.UpdateChat(
                cs.UpdateChatRequest(
                    chat=chat_pb2.Chat(id=chat.id), update_mask=field_mask_pb2.FieldMask(paths=["status"])
                )
            ),
            "update_mask",
        ),
        (
            stub.UpdateChat(
                cs.UpdateChatRequest(
                    chat=chat_pb2.Chat(id=chat.id, title=""),
                    update_mask=field_mask_pb2.FieldMask(paths=["title"]),
                )
            ),
            "chat.title",
        ),
        (stub.UpdateChat(cs.UpdateChatRequest()), "chat.id"),
        (stub.DeleteChat(cs.DeleteChatRequest()), "chat_id"),
        (stub.SendMessage(cs.SendMessageRequest(content=text("x"))), "chat_id"),
        (
            stub.SendMessage(cs.SendMessageRequest(chat_id=chat.id, content=text("x"), busy_behavior=7)),  # type: ignore[arg-type]
            "busy_behavior",
        ),
        (stub.EditMessage(cs.EditMessageRequest(chat_id=chat.id, content=text("x"))), "message_id"),
        (stub.ListMessages(cs.ListMessagesRequest(chat_id=chat.id, page_size=-5)), "page_size"),
        (stub.ListMessages(cs.ListMessagesRequest(chat_id=chat.id, page_token="zz")), "page_token"),
        (stub.ListQueuedMessages(cs.ListQueuedMessagesRequest()), "chat_id"),
        (stub.DeleteQueuedMessage(cs.DeleteQueuedMessageRequest(chat_id=chat.id)), "queued_message_id"),
        (stub.PromoteQueuedMessage(cs.PromoteQueuedMessageRequest(chat_id=chat.id)), "queued_message_id"),
        (stub.InterruptChat(cs.InterruptChatRequest(chat_id="1")), "chat_id"),
        (stub.ForkChat(cs.ForkChatRequest(chat_id=chat.id, message_id="x")), "message_id"),
        (stub.CompactChat(cs.CompactChatRequest()), "chat_id"),
        (
            stub.GetUsage(
                cs.GetUsageRequest(
                    start_time=timestamp_pb2.Timestamp(seconds=200),
                    end_time=timestamp_pb2.Timestamp(seconds=100),
                )
            ),
            "end_time",
        ),
    ]
    for pending_call, field in cases:
        err = await _fails(pending_call, bad, field)
        info = rpc_errors.error_info(err)
        assert info is not None and info[1].get("field", "").startswith(field.split("[")[0]), (field, info)


async def test_owner_isolation(stack: Stack) -> None:
    alice, bob = stack.stub("alice"), stack.stub("bob")
    chat = (await alice.CreateChat(cs.CreateChatRequest(content=text("secret")))).chat
    nf = grpc.StatusCode.NOT_FOUND
    await _fails(bob.GetChat(cs.GetChatRequest(chat_id=chat.id)), nf, chat.id)
    await _fails(bob.SendMessage(cs.SendMessageRequest(chat_id=chat.id, content=text("x"))), nf)
    await _fails(bob.ListMessages(cs.ListMessagesRequest(chat_id=chat.id)), nf)
    await _fails(bob.InterruptChat(cs.InterruptChatRequest(chat_id=chat.id)), nf)
    # Deletes are idempotent: bob's delete of alice's chat answers as if it were gone (which, to
    # him, it is) and leaves it alone; so does his delete of one of its queued messages.
    await bob.DeleteChat(cs.DeleteChatRequest(chat_id=chat.id))
    await bob.DeleteQueuedMessage(cs.DeleteQueuedMessageRequest(chat_id=chat.id, queued_message_id=MISSING))
    assert (await alice.GetChat(cs.GetChatRequest(chat_id=chat.id))).chat.id == chat.id
    await _fails(bob.ForkChat(cs.ForkChatRequest(chat_id=chat.id)), nf)
    await _fails(bob.CompactChat(cs.CompactChatRequest(chat_id=chat.id)), nf)
    await _fails(bob.ListQueuedMessages(cs.ListQueuedMessagesRequest(chat_id=chat.id)), nf)
    await _fails(
        bob.UpdateChat(
            cs.UpdateChatRequest(
                chat=chat_pb2.Chat(id=chat.id, title="mine"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            )
        ),
        nf,
    )
    assert not (await bob.ListChats(cs.ListChatsRequest())).chats
    await _fails(bob.GetUsage(cs.GetUsageRequest(user_id="alice")), grpc.StatusCode.PERMISSION_DENIED)
    # A workspace of another user cannot be attached: to bob it does not exist.
    ws = await stack.workspace("alice")
    err = await _fails(
        bob.CreateChat(cs.CreateChatRequest(content=text("x"), workspace_id=ws)),
        nf,
        ws,
    )
    assert (rpc_errors.error_info(err) or ("", {}))[0] == "WORKSPACE_NOT_FOUND"


async def test_update_list_fork_edit_usage_delete(stack: Stack) -> None:
    stub = stack.stub()
    chats = []
    for i in range(3):
        c = (await stub.CreateChat(cs.CreateChatRequest(content=text(f"chat {i} [[words=3]]")))).chat
        await stack.wait_status(c.id, chat_pb2.CHAT_STATUS_WAITING)
        chats.append(c)
    page1 = await stub.ListChats(cs.ListChatsRequest(page_size=2))
    page2 = await stub.ListChats(cs.ListChatsRequest(page_size=2, page_token=page1.next_page_token))
    assert [c.id for c in page1.chats] + [c.id for c in page2.chats] == [c.id for c in reversed(chats)]
    assert not page2.next_page_token

    updated = await stub.UpdateChat(
        cs.UpdateChatRequest(
            chat=chat_pb2.Chat(id=chats[0].id, title="Renamed", archived=True),
            update_mask=field_mask_pb2.FieldMask(paths=["title", "archived"]),
        )
    )
    assert updated.chat.title == "Renamed" and updated.chat.archived
    assert chats[0].id not in [c.id for c in (await stub.ListChats(cs.ListChatsRequest())).chats]
    archived = await stub.ListChats(cs.ListChatsRequest(archived=True))
    assert [c.id for c in archived.chats] == [chats[0].id]
    waiting = await stub.ListChats(cs.ListChatsRequest(status=chat_pb2.CHAT_STATUS_WAITING))
    assert {c.id for c in waiting.chats} == {chats[1].id, chats[2].id}

    msgs = await stack.messages(chats[1].id)
    fork = await stub.ForkChat(
        cs.ForkChatRequest(chat_id=chats[1].id, message_id=msgs[0].id, request_id="f1")
    )
    again = await stub.ForkChat(
        cs.ForkChatRequest(chat_id=chats[1].id, message_id=msgs[0].id, request_id="f1")
    )
    assert fork.chat.id == again.chat.id and fork.chat.parent_chat_id == chats[1].id
    forked = await stack.messages(fork.chat.id)
    assert [m.parts[0].text.text for m in forked] == [msgs[0].parts[0].text.text]

    edited = await stub.EditMessage(
        cs.EditMessageRequest(chat_id=chats[1].id, message_id=msgs[0].id, content=text("edited [[words=2]]"))
    )
    assert edited.chat.status == chat_pb2.CHAT_STATUS_PENDING
    await stack.wait_status(chats[1].id, chat_pb2.CHAT_STATUS_WAITING)
    after = await stack.messages(chats[1].id)
    assert [m.role for m in after] == [chat_pb2.MESSAGE_ROLE_USER, chat_pb2.MESSAGE_ROLE_ASSISTANT]
    assert after[0].parts[0].text.text == "edited [[words=2]]" and after[0].id == edited.message.id
    await _fails(
        stub.EditMessage(
            cs.EditMessageRequest(chat_id=chats[1].id, message_id=after[1].id, content=text("x"))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    usage = await stub.GetUsage(cs.GetUsageRequest())
    assert usage.chats == 4  # the fork copied a message, so it has activity too
    assert usage.usage.output_tokens > 0
    assert [m.model_config_id for m in usage.by_model] == [stack.model_config_id]
    admin = stack.stub("admin", role="admin")
    assert (await admin.GetUsage(cs.GetUsageRequest(user_id="alice"))).usage == usage.usage

    await stub.DeleteChat(cs.DeleteChatRequest(chat_id=chats[2].id))
    await _fails(stub.GetChat(cs.GetChatRequest(chat_id=chats[2].id)), grpc.StatusCode.NOT_FOUND)
    await stub.DeleteChat(cs.DeleteChatRequest(chat_id=chats[2].id))  # idempotent: gone is deleted


async def test_queue_management_and_limit(stack: Stack) -> None:
    stub = stack.stub()
    stack.sim.set_script(
        Script.from_data({"conversations": [{"turns": [{"text": "held", "gate": "busy"}, {"text": "ok"}]}]})
    )
    chat = (await stub.CreateChat(cs.CreateChatRequest(content=text("busy")))).chat
    # The first reply holds at the gate (never opened): the chat stays busy for the whole test.
    await stack.sim.wait_held("busy")
    await _fails(
        stub.CompactChat(cs.CompactChatRequest(chat_id=chat.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "running",
    )
    ids = []
    for i in range(20):
        r = await stub.SendMessage(cs.SendMessageRequest(chat_id=chat.id, content=text(f"q{i}")))
        ids.append(r.queued_message.id)
    await _fails(
        stub.SendMessage(cs.SendMessageRequest(chat_id=chat.id, content=text("one too many"))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "20 queued",
    )
    promoted = await stub.PromoteQueuedMessage(
        cs.PromoteQueuedMessageRequest(chat_id=chat.id, queued_message_id=ids[5])
    )
    assert promoted.queued_messages[0].id == ids[5]
    await stub.DeleteQueuedMessage(cs.DeleteQueuedMessageRequest(chat_id=chat.id, queued_message_id=ids[0]))
    # Idempotent: deleting it again succeeds and changes nothing.
    last_seq = (await stub.GetChat(cs.GetChatRequest(chat_id=chat.id))).chat.last_seq
    await stub.DeleteQueuedMessage(cs.DeleteQueuedMessageRequest(chat_id=chat.id, queued_message_id=ids[0]))
    assert (await stub.GetChat(cs.GetChatRequest(chat_id=chat.id))).chat.last_seq == last_seq
    page = await stub.ListQueuedMessages(cs.ListQueuedMessagesRequest(chat_id=chat.id, page_size=5))
    rest = await stub.ListQueuedMessages(
        cs.ListQueuedMessagesRequest(chat_id=chat.id, page_size=100, page_token=page.next_page_token)
    )
    order = [q.id for q in page.queued_messages] + [q.id for q in rest.queued_messages]
    assert order == [ids[5], *ids[1:5], *ids[6:]]
    # Stop the turn; the queue stays for the user to deal with.
    await stub.InterruptChat(cs.InterruptChatRequest(chat_id=chat.id))
    await wait_until(
        lambda: stack.chat_of(chat.id),
        until=lambda c: c.status == chat_pb2.CHAT_STATUS_WAITING and c.queued_message_count == 19,
        what="the interrupted chat to wait with its 19 queued messages",
    )
    # The held generation was cancelled: its provider stream closed, not released by the gate.
    await stack.sim.wait_until(lambda: stack.sim.client_closed_streams == 1)
    assert stack.sim.gate("busy").held == 0 and not stack.sim.gate("busy").open


async def test_compact_chat_on_demand(stack: Stack) -> None:
    stub = stack.stub()
    chat = (await stub.CreateChat(cs.CreateChatRequest(content=text("remember the number 42")))).chat
    await stack.wait_status(chat.id, chat_pb2.CHAT_STATUS_WAITING)
    # The summary request carries one assistant message, so the simulator answers with turn 1.
    stack.sim.set_script(
        Script.from_data(
            {"conversations": [{"turns": [{"text": "unused"}, {"text": "SUMMARY: the number is 42"}]}]}
        )
    )
    resp = await stub.CompactChat(cs.CompactChatRequest(chat_id=chat.id))
    assert resp.summary.role == chat_pb2.MESSAGE_ROLE_SUMMARY
    assert resp.summary.parts[0].text.text == "SUMMARY: the number is 42"
    stack.sim.set_script(None)
    await stub.SendMessage(cs.SendMessageRequest(chat_id=chat.id, content=text("and now?")))
    await stack.wait_status(chat.id, chat_pb2.CHAT_STATUS_WAITING)
    # The next generation sent the summary instead of the history before it.
    sent = stack.sim.requests[-1].body["messages"]
    contents = " ".join(str(m["content"]) for m in sent)
    assert "SUMMARY: the number is 42" in contents and "remember the number 42" not in contents
