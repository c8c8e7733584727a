"""Oversized inputs are refused with a message that names the limit, or cut down and say so.

`LIMITS` is every size limit of the API, one row each: the RPC, a request just past it (often far
past: a 1 MiB title, 10,000 content parts), the status and the words the message must contain. Each
refusal is also a well-formed error (ErrorInfo, no INTERNAL) whose message stays short however
large the offending value. Past every limit is gRPC's own: a 20 MiB request to any server is
RESOURCE_EXHAUSTED before a handler runs. What is not refused is cut: a command's huge output and a
huge file read come back truncated, saying so.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2
from agentplane.config.v1 import config_pb2, config_service_pb2, token_service_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2
from agentplane.toolexec.v1 import toolexec_service_pb2
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from services.common.server import MAX_MESSAGE_BYTES
from services.common.settings import Settings
from tests.hostile.rpcs import check_error, invoke, rpc
from tests.hostile.world import World, start_world, text

MIB = 1024 * 1024
PNG = b"\x89PNG\r\n\x1a\n"
# However large the value an error quotes, its message stays this short (the trailers that carry
# it are capped at 16 KiB: services/common/rpc_errors.py).
MAX_MESSAGE_CHARS = 2100

ADMIN = ("admin", "admin", "")
ALICE = ("alice", "user", "")
CHAT_FOR_ALICE = ("service:chat", "service", "alice")


@dataclass(frozen=True)
class Limit:
    """One limit: who calls what with which request, and the refusal expected."""

    label: str
    rpc: str
    caller: tuple[str, str, str]
    build: Callable[[World], Message]
    says: str
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


def _image(size: int) -> chat_pb2.ContentPart:
    return chat_pb2.ContentPart(image=chat_pb2.ImagePart(data=PNG + b"\0" * size, mime_type="image/png"))


def _template(**fields: object) -> config_pb2.WorkspaceTemplate:
    source = config_pb2.TemplateSource(directory=config_pb2.DirectorySource(path="/srv/x"))
    base: dict[str, object] = {"name": f"t-{uuid.uuid4().hex[:8]}", "description": "d", "source": source}
    return config_pb2.WorkspaceTemplate(**{**base, **fields})  # type: ignore[arg-type]


c, cfg, t = chat_service_pb2, config_service_pb2, toolexec_service_pb2
LIMITS = [
    Limit(
        "a 1 MiB chat title",
        "ChatService.CreateChat",
        ALICE,
        lambda w: c.CreateChatRequest(content=text("hi"), title="t" * MIB),
        "at most 200 characters",
    ),
    Limit(
        "10,000 content parts",
        "ChatService.CreateChat",
        ALICE,
        lambda w: c.CreateChatRequest(content=text("x") * 10_000),
        "10,000 parts; the limit is 100",
    ),
    Limit(
        "a part of a million and one characters",
        "ChatService.CreateChat",
        ALICE,
        lambda w: c.CreateChatRequest(content=text("x" * 1_000_001)),
        "1,000,001 characters; the limit is 1,000,000",
    ),
    Limit(
        "fifteen parts of 900,000 characters",
        "ChatService.CreateChat",
        ALICE,
        lambda w: c.CreateChatRequest(content=text("x" * 900_000) * 15),
        "13,500,000 characters in all",
    ),
    Limit(
        "an 11 MB image",
        "ChatService.SendMessage",
        ALICE,
        lambda w: c.SendMessageRequest(chat_id=w.users["alice"].chat_id, content=[_image(11_000_000)]),
        "the limit is 10 MB",
    ),
    Limit(
        "a 1 MiB request id",
        "ChatService.CreateChat",
        ALICE,
        lambda w: c.CreateChatRequest(content=text("hi"), request_id="r" * MIB),
        "at most 200 characters",
    ),
    Limit(
        "a 1 MiB title on rename",
        "ChatService.UpdateChat",
        ALICE,
        lambda w: c.UpdateChatRequest(
            chat=chat_pb2.Chat(id=w.users["alice"].chat_id, title="t" * MIB),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        ),
        "at most 200 characters",
    ),
    Limit(
        "a 1 MiB title on fork",
        "ChatService.ForkChat",
        ALICE,
        lambda w: c.ForkChatRequest(chat_id=w.users["alice"].chat_id, title="t" * MIB),
        "at most 200 characters",
    ),
    Limit(
        "a 1 MiB provider name",
        "ConfigService.CreateProvider",
        ADMIN,
        lambda w: cfg.CreateProviderRequest(
            provider=config_pb2.Provider(type=config_pb2.PROVIDER_TYPE_OPENAI, display_name="p" * MIB)
        ),
        "at most 200 characters",
    ),
    Limit(
        "a 3,000 character base URL",
        "ConfigService.CreateProvider",
        ADMIN,
        lambda w: cfg.CreateProviderRequest(
            provider=config_pb2.Provider(
                type=config_pb2.PROVIDER_TYPE_OPENAI, display_name="p", base_url="https://h/" + "a" * 3000
            )
        ),
        "at most 2048 characters",
    ),
    Limit(
        "a 10,000 character API key",
        "ConfigService.CreateProvider",
        ADMIN,
        lambda w: cfg.CreateProviderRequest(
            provider=config_pb2.Provider(type=config_pb2.PROVIDER_TYPE_OPENAI, display_name="p"),
            api_key="k" * 10_000,
        ),
        "at most 8192 characters",
    ),
    Limit(
        "a 300 KiB system prompt",
        "ConfigService.UpdateSystemPrompt",
        ADMIN,
        lambda w: cfg.UpdateSystemPromptRequest(text="s" * 300 * 1024),
        "at most 262144 bytes",
    ),
    Limit(
        "a 40 KiB user prompt",
        "ConfigService.UpdateUserPrompt",
        ALICE,
        lambda w: cfg.UpdateUserPromptRequest(text="u" * 40 * 1024),
        "at most 32768 bytes",
    ),
    Limit(
        "51 template parameters",
        "ConfigService.CreateWorkspaceTemplate",
        ADMIN,
        lambda w: cfg.CreateWorkspaceTemplateRequest(
            workspace_template=_template(
                parameters=[config_pb2.TemplateParameter(name=f"p{i}") for i in range(51)]
            )
        ),
        "at most 50 parameters",
    ),
    Limit(
        "a 1 MiB template description",
        "ConfigService.CreateWorkspaceTemplate",
        ADMIN,
        lambda w: cfg.CreateWorkspaceTemplateRequest(workspace_template=_template(description="d" * MIB)),
        "at most 8000 characters",
    ),
    Limit(
        "a 1 MiB model name",
        "ConfigService.CreateModelConfig",
        ADMIN,
        lambda w: cfg.CreateModelConfigRequest(
            model_config=config_pb2.ModelConfig(
                provider_id=w.provider_id, model_name="m" * MIB, context_limit=1000
            )
        ),
        "at most 200 characters",
    ),
    Limit(
        "a 1 MiB revocation reason",
        "TokenService.RevokeToken",
        ADMIN,
        lambda w: token_service_pb2.RevokeTokenRequest(token_id="jti", reason="r" * MIB),
        "at most 500 characters",
    ),
    Limit(
        "a 1 MiB token id",
        "TokenService.RevokeToken",
        ADMIN,
        lambda w: token_service_pb2.RevokeTokenRequest(token_id="j" * MIB),
        "at most 200 characters",
    ),
    Limit(
        "a 1 MiB workspace name",
        "ToolExecService.CreateWorkspace",
        ALICE,
        lambda w: t.CreateWorkspaceRequest(name="w" * MIB),
        "at most 200 characters",
    ),
    Limit(
        "a 1 MiB workspace request id",
        "ToolExecService.CreateWorkspace",
        ALICE,
        lambda w: t.CreateWorkspaceRequest(name="w", request_id="r" * MIB),
        "at most 200 characters",
    ),
    Limit(
        "a 5,000 character template parameter",
        "ToolExecService.CreateWorkspace",
        ALICE,
        lambda w: t.CreateWorkspaceRequest(name="w", template_id=w.template_id, parameters={"p": "v" * 5000}),
        "at most 4096 characters",
    ),
    Limit(
        "a 1 MiB tool call id",
        "ToolExecService.CallTool",
        ALICE,
        lambda w: t.CallToolRequest(
            workspace_id=w.users["alice"].workspace_id,
            tool_call_id="c" * MIB,
            name="read_file",
            arguments_json="{}",
        ),
        "at most 256 characters",
    ),
    Limit(
        "a 1 MiB tool name",
        "ToolExecService.CallTool",
        ALICE,
        lambda w: t.CallToolRequest(
            workspace_id=w.users["alice"].workspace_id, tool_call_id="c", name="n" * MIB, arguments_json="{}"
        ),
        "at most 128 characters",
    ),
    Limit(
        "an 11 MB image to a model",
        "InferenceService.Generate",
        CHAT_FOR_ALICE,
        lambda w: inference_service_pb2.GenerateRequest(
            messages=[
                inference_pb2.Message(
                    role=inference_pb2.ROLE_USER,
                    parts=[
                        inference_pb2.ContentPart(
                            image=inference_pb2.ImagePart(
                                data=PNG + b"\0" * 11_000_000, mime_type="image/png"
                            )
                        )
                    ],
                )
            ]
        ),
        "the limit is 10 MB",
    ),
]


@pytest.fixture(scope="module")
async def big_world(
    module_settings: Settings, make_token: Callable[..., str], module_workspaces_dir: str
) -> AsyncIterator[World]:
    """The seeded world with sandboxed (local) workspaces, for the truncation tests."""
    w = await start_world(module_settings, make_token, module_workspaces_dir, default_driver="local")
    try:
        await w.agent_connected("alice", w.users["alice"].workspace_id)
        yield w
    finally:
        await w.stop()


@pytest.mark.parametrize("limit", LIMITS, ids=lambda limit: limit.label)
async def test_past_a_limit_the_refusal_names_it(big_world: World, limit: Limit) -> None:
    target = rpc(limit.rpc)
    request = limit.build(big_world)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await invoke(big_world.channel(target.server), target, request, big_world.metadata(*limit.caller))
    exc = caught.value
    check_error(exc, limit.label)
    details = exc.details() or ""
    assert exc.code() == limit.code, f"{limit.label}: {exc.code().name} {details[:300]}"
    assert limit.says in details, f"{limit.label}: {details[:300]!r} does not say {limit.says!r}"
    assert len(details) <= MAX_MESSAGE_CHARS, f"{limit.label}: a {len(details)} character message"


def test_every_rpc_refusing_sizes_is_listed() -> None:
    # The services' size limits, by the RPCs that enforce them: a limit added to one of these
    # services' validation gets a row above (this list is the inventory of docs/testing.md).
    assert {limit.rpc for limit in LIMITS} >= {
        "ChatService.CreateChat",
        "ChatService.SendMessage",
        "ChatService.UpdateChat",
        "ChatService.ForkChat",
        "ConfigService.CreateProvider",
        "ConfigService.UpdateSystemPrompt",
        "ConfigService.UpdateUserPrompt",
        "ConfigService.CreateWorkspaceTemplate",
        "TokenService.RevokeToken",
        "ToolExecService.CreateWorkspace",
        "ToolExecService.CallTool",
        "InferenceService.Generate",
    }


@pytest.mark.parametrize("server", ["config", "inference", "toolexec", "chat"])
async def test_a_20_mib_request_is_refused_before_any_handler(big_world: World, server: str) -> None:
    target = {
        "config": rpc("ConfigService.UpdateSystemPrompt"),
        "inference": rpc("InferenceService.ListProviderModels"),
        "toolexec": rpc("ToolExecService.CreateWorkspace"),
        "chat": rpc("ChatService.CreateChat"),
    }[server]
    field = {"config": "text", "inference": "provider_id", "toolexec": "name", "chat": "request_id"}[server]
    request = target.request_class(**{field: "x" * (20 * MIB)})
    # Our own channels refuse to send more than MAX_MESSAGE_BYTES; this one sends it anyway.
    big = 64 * MIB
    channel = grpc.aio.insecure_channel(
        big_world.address(server),
        options=[("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)],
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await invoke(channel, target, request, big_world.metadata(*ADMIN))
    finally:
        await channel.close()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
    details = caught.value.details() or ""
    assert "larger than max" in details and str(MAX_MESSAGE_BYTES) in details, details


async def test_huge_output_and_files_come_back_truncated_and_say_so(big_world: World) -> None:
    stub = big_world.toolexec("alice")
    workspace = big_world.users["alice"].workspace_id

    async def call(name: str, arguments: dict[str, object]) -> toolexec_service_pb2.CallToolResponse:
        return await stub.CallTool(
            toolexec_service_pb2.CallToolRequest(
                workspace_id=workspace,
                tool_call_id=uuid.uuid4().hex,
                name=name,
                arguments_json=json.dumps(arguments),
            ),
            timeout=60,
        )

    printed = await call("execute", {"command": "head -c 20000000 /dev/zero | tr '\\0' a; echo; echo END"})
    assert not printed.is_error, printed.content[:500]
    assert len(printed.content) < 40_000 and "bytes of output omitted" in printed.content
    assert printed.content.rstrip().endswith("END"), printed.content[-200:]
    assert json.loads(printed.structured_json)["truncated"] is True

    made = await call(
        "execute",
        {"command": "python3 -c \"print('b' * 3_000_000); [print(i) for i in range(30000)]\" > big.txt"},
    )
    assert not made.is_error, made.content
    read = await call("read_file", {"path": "big.txt"})
    assert not read.is_error, read.content[:300]
    assert "b" * 2000 + "... [line cut at 2000 characters]" in read.content, read.content[:300]
    assert len(read.content) < 200_000 and "call read_file with offset=" in read.content
    assert json.loads(read.structured_json)["truncated"] is True
