"""The chat service's test stack: the LLM simulator plus the four real services in-process.

Every service runs its real server on port 0 against this test's database and Redis; the
model config points at the simulator through the config service (seeded with its RPCs).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from agentplane.config.v1 import config_pb2
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from google.protobuf import field_mask_pb2
from prometheus_client import CollectorRegistry

from services.chat import server as chat_server
from services.chat.settings import ChatSettings
from services.common.client import create_channel
from services.common.settings import Settings
from services.config import server as config_server
from services.config.testing import seed_provider_and_model
from services.inference import server as inference_server
from services.simulator.script import Script
from services.simulator.server import SimulatorHandle, start_simulator
from services.toolexec import server as toolexec_server
from services.toolexec.settings import ToolexecSettings
from tests.helpers import wait_until

FAST_CHAT = ChatSettings(
    max_concurrent_chats=16,
    lease_seconds=3.0,
    renew_interval_seconds=0.5,
    poll_interval_seconds=0.5,
    sweep_interval_seconds=0.5,
    delta_flush_ms=20,
)


def read_file(path: str) -> str | None:
    """A file's text, or None when it does not exist (sync: called from tests on local files)."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_file(path: str, content: str) -> None:
    """Write a local file."""
    with open(path, "w") as f:
        f.write(content)


def text(value: str) -> list[chat_pb2.ContentPart]:
    """A user message of one text part."""
    return [chat_pb2.ContentPart(text=chat_pb2.TextPart(text=value))]


@dataclass
class Stack:
    """The running services and helpers for a test."""

    settings: Settings
    sim: SimulatorHandle
    model_config_id: str
    make_token: Callable[..., str]
    workspaces_dir: str
    servers: list[Any]
    chat: chat_server.ChatServer
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(
        self, user: str = "alice", chat: chat_server.ChatServer | None = None, role: str = "user"
    ) -> Any:
        """A ChatService stub authenticated as `user` (with `role`)."""
        channel = create_channel((chat or self.chat).address, token=self.make_token(user, role))
        self._channels.append(channel)
        return chat_service_pb2_grpc.ChatServiceStub(channel)

    def toolexec(self, user: str = "alice") -> Any:
        """A ToolExecService stub authenticated as `user`."""
        channel = create_channel(self.settings.address("toolexec"), token=self.make_token(user))
        self._channels.append(channel)
        return toolexec_service_pb2_grpc.ToolExecServiceStub(channel)

    async def workspace(self, user: str = "alice") -> str:
        """A new empty workspace of `user`."""
        resp = await self.toolexec(user).CreateWorkspace(
            toolexec_service_pb2.CreateWorkspaceRequest(name=f"ws-{uuid.uuid4().hex[:8]}")
        )
        return str(resp.workspace.id)

    def workspace_path(self, workspace_id: str) -> str:
        """Where toolexec keeps a workspace's files (the local driver's layout)."""
        for root, dirs, _files in os.walk(self.workspaces_dir):
            if workspace_id in dirs:
                return os.path.join(root, workspace_id)
        raise AssertionError(f"workspace {workspace_id} has no directory under {self.workspaces_dir}")

    async def chat_of(self, chat_id: str, user: str = "alice") -> chat_pb2.Chat:
        """GetChat."""
        resp = await self.stub(user).GetChat(chat_service_pb2.GetChatRequest(chat_id=chat_id))
        return resp.chat

    async def wait_status(
        self,
        chat_id: str,
        status: chat_pb2.ChatStatus.ValueType,
        *,
        within: float = 20.0,
        user: str = "alice",
    ) -> None:
        """Wait until the chat has `status` and no queued messages."""
        await wait_until(
            lambda: self.chat_of(chat_id, user),
            until=lambda chat: chat.status == status and chat.queued_message_count == 0,
            what=f"chat {chat_id} to be {chat_pb2.ChatStatus.Name(status)} with an empty queue",
            timeout=within,
        )

    async def messages(self, chat_id: str, user: str = "alice") -> list[chat_pb2.Message]:
        """Every visible message, oldest first."""
        resp = await self.stub(user).ListMessages(chat_service_pb2.ListMessagesRequest(chat_id=chat_id))
        return list(resp.messages)

    async def start_chat_replica(self, chat_settings: ChatSettings) -> chat_server.ChatServer:
        """Another chat replica in this process on the same database."""
        server = await chat_server.start(self.settings, chat_settings, registry=CollectorRegistry())
        self.servers.append(server)
        return server


async def until_watch_is_live(
    stack: Stack, seen: list[chat_service_pb2.WatchChatsResponse], user: str = "alice"
) -> str:
    """Rename a chat of `user` until the WatchChats call whose changes land in `seen` reports it.

    A watch subscribes on the server some time after the call starts; from the first change it
    reports on, it sees every later one. Returns the id of the renamed (probe) chat.
    """
    stub = stack.stub(user)
    probe = (await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("probe")))).chat
    await stack.wait_status(probe.id, chat_pb2.CHAT_STATUS_WAITING, user=user)
    renames = 0

    async def rename_and_look() -> bool:
        nonlocal renames
        renames += 1
        await stub.UpdateChat(
            chat_service_pb2.UpdateChatRequest(
                chat=chat_pb2.Chat(id=probe.id, title=f"probe {renames}"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            )
        )
        return any(c.chat.id == probe.id for c in seen)

    await wait_until(rename_and_look, what=f"{user}'s watch to report a renamed chat")
    return str(probe.id)


async def start_stack(
    settings: Settings,
    make_token: Callable[..., str],
    workspaces_dir: str,
    *,
    chat_settings: ChatSettings = FAST_CHAT,
    script: Script | None = None,
) -> Stack:
    """Simulator, config (seeded), inference, toolexec and chat, wired together.

    The simulator answers at once; a test that must act while a reply is being generated marks
    the turn with a gate (docs/simulator.md) instead of slowing the simulator down.
    """
    servers: list[Any] = []
    sim = await start_simulator(script=script)
    try:
        config = await config_server.start(settings, registry=CollectorRegistry())
        servers.append(config)
        settings = settings.with_service("config", address=config.address)
        _, model_id = await seed_provider_and_model(
            config.address,
            make_token("admin", "admin"),
            provider_type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
            base_url=sim.openai_base_url,
            api_key="sk-test",
            model_name="sim-model",
            context_limit=200_000,
        )
        inference = await inference_server.build(settings)
        await inference.start()
        servers.append(inference)
        settings = settings.with_service("inference", address=inference.address)
        toolexec = await toolexec_server.start(
            settings, toolexec_settings=ToolexecSettings(workspaces_dir=workspaces_dir)
        )
        servers.append(toolexec)
        settings = settings.with_service("toolexec", address=toolexec.address)
        chat = await chat_server.start(settings, chat_settings, registry=CollectorRegistry())
        servers.append(chat)
        settings = settings.with_service("chat", address=chat.address)
    except BaseException:
        for s in reversed(servers):
            await s.stop()
        await sim.stop()
        raise
    return Stack(settings, sim, model_id, make_token, workspaces_dir, servers, chat)


async def stop_stack(stack: Stack) -> None:
    """Stop every server (chat replicas first) and the simulator."""
    for channel in stack._channels:
        await channel.close()
    for s in reversed(stack.servers):
        await s.stop()
    await stack.sim.stop()


@pytest.fixture
async def stack(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str
) -> AsyncIterator[Stack]:
    """The default stack: instant simulator replies, fast leases."""
    s = await start_stack(settings, make_token, workspaces_dir)
    try:
        yield s
    finally:
        await stop_stack(s)
