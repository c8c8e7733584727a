"""Errors a person reads: message content problems in words, a missing workspace as NOT_FOUND.

Messages speak of "the message" and its parts, not of request paths like ``content[0].text.text``;
the path stays machine-readable in the ErrorInfo's ``field`` metadata. A workspace that does not
exist (or is another user's) is NOT_FOUND with reason WORKSPACE_NOT_FOUND; a malformed workspace id
stays INVALID_ARGUMENT. Against the real stack (chat, toolexec, config, inference, simulator).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from agentplane.chat.v1 import chat_pb2
from agentplane.chat.v1 import chat_service_pb2 as cs

from services.common import rpc_errors
from tests.chat.conftest import Stack, text

TIFF = chat_pb2.ContentPart(image=chat_pb2.ImagePart(data=b"x", mime_type="image/tiff"))
EMPTY_PNG = chat_pb2.ContentPart(image=chat_pb2.ImagePart(data=b"", mime_type="image/png"))
TOOL_CALL = chat_pb2.ContentPart(tool_call=chat_pb2.ToolCallPart(id="1", name="x"))
UNSET = chat_pb2.ContentPart()


async def _fails(call: Any, code: grpc.StatusCode) -> tuple[str, str, dict[str, str]]:
    """The details, ErrorInfo reason and metadata of a call that must fail with `code`."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    details = err.value.details() or ""
    assert err.value.code() == code, details
    info = rpc_errors.error_info(err.value)
    assert info is not None, details
    return details, info[0], info[1]


async def test_content_errors_speak_of_the_message_not_field_paths(stack: Stack) -> None:
    stub = stack.stub()
    chat = (await stub.CreateChat(cs.CreateChatRequest(content=text("hi")))).chat
    message_id = (await stack.messages(chat.id))[0].id
    ok = text("look at this")[0]
    cases: list[tuple[Any, str, str]] = [
        (
            stub.CreateChat(cs.CreateChatRequest()),
            "content",
            "the message is empty: give it some text or an image",
        ),
        (
            stub.SendMessage(cs.SendMessageRequest(chat_id=chat.id)),
            "content",
            "the message is empty: give it some text or an image",
        ),
        (
            stub.EditMessage(cs.EditMessageRequest(chat_id=chat.id, message_id=message_id)),
            "content",
            "the message is empty: give it some text or an image",
        ),
        (
            stub.CreateChat(cs.CreateChatRequest(content=text("  "))),
            "content[0].text.text",
            "the message: text must not be empty",
        ),
        (
            stub.CreateChat(cs.CreateChatRequest(content=[ok, TIFF])),
            "content[1].image.mime_type",
            "the message's second part: the image type is 'image/tiff'; use one of image/gif, image/jpeg, "
            "image/png, image/webp",
        ),
        (
            stub.CreateChat(cs.CreateChatRequest(content=[TOOL_CALL])),
            "content[0]",
            "the message is a tool call; a user message may hold text and images only",
        ),
        (
            stub.SendMessage(cs.SendMessageRequest(chat_id=chat.id, content=[ok, ok, UNSET])),
            "content[2]",
            "the message's third part is empty: give it text or an image",
        ),
        (
            stub.EditMessage(
                cs.EditMessageRequest(chat_id=chat.id, message_id=message_id, content=[EMPTY_PNG])
            ),
            "content[0].image.data",
            "the message: the image is empty",
        ),
    ]
    for call, field, message in cases:
        details, reason, metadata = await _fails(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert details == message, (field, details)
        assert "[" not in details and ".text" not in details and ".image" not in details, details
        # The exact path, for programs, stays in the metadata.
        assert (reason, metadata.get("field")) == ("INVALID_ARGUMENT", field), (details, metadata)


async def test_missing_workspace_is_not_found(stack: Stack) -> None:
    alice, bob = stack.stub("alice"), stack.stub("bob")
    missing = "ws_" + "0" * 20  # well formed, never created
    details, reason, metadata = await _fails(
        alice.CreateChat(cs.CreateChatRequest(content=text("x"), workspace_id=missing)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "WORKSPACE_NOT_FOUND" and metadata.get("workspace_id") == missing, (reason, metadata)
    assert details.startswith(f"workspace {missing} not found: it does not exist"), details

    # Another user's workspace is as missing as one that never existed (no existence leak).
    alices = await stack.workspace("alice")
    details, reason, metadata = await _fails(
        bob.CreateChat(cs.CreateChatRequest(content=text("x"), workspace_id=alices)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "WORKSPACE_NOT_FOUND" and metadata.get("workspace_id") == alices, (reason, metadata)
    assert details.startswith(f"workspace {alices} not found"), details

    # A malformed id is still the caller's mistake in the request: INVALID_ARGUMENT naming the field.
    details, reason, metadata = await _fails(
        alice.CreateChat(cs.CreateChatRequest(content=text("x"), workspace_id="my-workspace")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (reason, metadata.get("field")) == ("INVALID_ARGUMENT", "workspace_id"), (reason, metadata)
    assert details.startswith("workspace_id: 'my-workspace' is not a workspace id"), details

    # Nothing was created by any of these.
    assert not (await bob.ListChats(cs.ListChatsRequest())).chats
    assert not (await alice.ListChats(cs.ListChatsRequest())).chats
