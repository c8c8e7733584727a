"""The fault suite's stack: the simulator, config, inference and (unless a test runs its own
process) toolexec in this process, plus chat replicas; every service on this test's database.

Unlike `tests/chat/conftest.py::start_stack`, the provider is seeded twice (an OpenAI-compatible
model, the default, and an Anthropic one, whose `overloaded` fault is a real 529), inference
retries fast (a 429 storm is over in milliseconds, not seconds), and the in-process chat replica
usually serves the API only: the chats run on replicas the test can kill.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc.aio
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from agentplane.config.v1 import config_pb2
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from prometheus_client import CollectorRegistry

from services.chat import server as chat_server
from services.chat.settings import ChatSettings
from services.common.client import create_channel
from services.common.settings import Settings
from services.config import server as config_server
from services.config.testing import seed_provider_and_model
from services.inference import server as inference_server
from services.inference.settings import InferenceSettings
from services.simulator.script import Script
from services.simulator.server import SimulatorHandle, start_simulator
from services.toolexec import server as toolexec_server
from services.toolexec.settings import ToolexecSettings

# In-process chat replicas of the suite: as fast as the child processes' FAST_CHAT_ENV.
FAST_CHAT = ChatSettings(
    max_concurrent_chats=8,
    lease_seconds=3.0,
    renew_interval_seconds=0.5,
    poll_interval_seconds=0.5,
    sweep_interval_seconds=0.5,
    delta_flush_ms=20,
)
API_ONLY = ChatSettings(run_workers=False, delta_flush_ms=20)
# Retries after 10-80 ms instead of 0.5-8 s: provider faults cost the suite little time.
FAST_INFERENCE = InferenceSettings(retry_base_ms=10, retry_max_delay_ms=80, retry_budget_s=5)


@dataclass
class FaultStack:
    """The running services; `settings` is what the services were given (a datastore a test cuts
    may be behind it), `database_url` reaches the database directly for the checks."""

    settings: Settings
    database_url: str
    sim: SimulatorHandle
    models: dict[str, str]
    make_token: Callable[..., str]
    workspaces_dir: str
    chat: chat_server.ChatServer
    servers: list[Any]
    _channels: dict[tuple[str, str], grpc.aio.Channel] = field(default_factory=dict)

    def stub(self, address: str | None = None, user: str = "alice") -> Any:
        """A ChatService stub for `user` on the replica at `address` (the in-process one by default)."""
        key = (address or self.chat.address, user)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = create_channel(key[0], token=self.make_token(user))
        return chat_service_pb2_grpc.ChatServiceStub(channel)

    def toolexec(self, user: str = "alice") -> Any:
        key = (self.settings.address("toolexec"), user)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = create_channel(key[0], token=self.make_token(user))
        return toolexec_service_pb2_grpc.ToolExecServiceStub(channel)

    async def workspace(self, user: str = "alice") -> str:
        """A new empty workspace of `user` (its agent started)."""
        resp = await self.toolexec(user).CreateWorkspace(
            toolexec_service_pb2.CreateWorkspaceRequest(name=f"ws-{uuid.uuid4().hex[:8]}"),
            wait_for_ready=True,
            timeout=60,
        )
        return str(resp.workspace.id)

    def workspace_path(self, workspace_id: str) -> str:
        """Where the local driver keeps a workspace's files."""
        for root, dirs, _files in os.walk(self.workspaces_dir):
            if workspace_id in dirs:
                return os.path.join(root, workspace_id)
        raise AssertionError(f"workspace {workspace_id} has no directory under {self.workspaces_dir}")

    async def chat_of(self, chat_id: str) -> chat_pb2.Chat:
        resp = await self.stub().GetChat(chat_service_pb2.GetChatRequest(chat_id=chat_id))
        return resp.chat

    async def start_chat_replica(self, chat_settings: ChatSettings) -> chat_server.ChatServer:
        """Another chat replica in this process, with a worker id of its own (a settings object
        made once holds one id: two replicas sharing it would share leases and liveness lock)."""
        unique = replace(chat_settings, worker_id=f"in-process-{uuid.uuid4().hex[:8]}")
        server = await chat_server.start(self.settings, unique, registry=CollectorRegistry())
        self.servers.append(server)
        return server

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        for server in reversed(self.servers):
            await server.stop()
        await self.sim.stop()


async def start_fault_stack(
    settings: Settings,
    make_token: Callable[..., str],
    workspaces_dir: str,
    *,
    database_url: str | None = None,
    script: Script | None = None,
    chat_settings: ChatSettings = API_ONLY,
    toolexec: Callable[[Settings], Awaitable[str]] | None = None,
) -> FaultStack:
    """Start the stack on `settings`' database and Redis.

    `database_url` is the direct URL when `settings` reach the database through something the
    test cuts; `toolexec(settings)` starts a toolexec of the test's own (a child process it kills)
    once config runs and returns its address; without it toolexec runs in this process.
    """
    servers: list[Any] = []
    sim = await start_simulator(script=script)
    try:
        config = await config_server.start(
            settings, channel=f"test:config:{uuid.uuid4().hex}", registry=CollectorRegistry()
        )
        servers.append(config)
        settings = settings.with_service("config", address=config.address)
        admin = make_token("admin", "admin")
        _, anthropic = await seed_provider_and_model(
            config.address,
            admin,
            provider_type=config_pb2.PROVIDER_TYPE_ANTHROPIC,
            base_url=sim.anthropic_base_url,
            api_key="sk-test",
            model_name="sim-claude",
            context_limit=200_000,
            make_default=False,
        )
        _, openai = await seed_provider_and_model(
            config.address,
            admin,
            provider_type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
            base_url=sim.openai_base_url,
            api_key="sk-test",
            model_name="sim-model",
            context_limit=200_000,
        )
        inference = await inference_server.start(settings, FAST_INFERENCE)
        servers.append(inference)
        settings = settings.with_service("inference", address=inference.address)
        if toolexec is None:
            in_process = await toolexec_server.start(
                settings, toolexec_settings=ToolexecSettings(workspaces_dir=workspaces_dir)
            )
            servers.append(in_process)
            toolexec_address = in_process.address
        else:
            toolexec_address = await toolexec(settings)
        settings = settings.with_service("toolexec", address=toolexec_address)
        own_id = replace(chat_settings, worker_id=f"in-process-{uuid.uuid4().hex[:8]}")
        chat = await chat_server.start(settings, own_id, registry=CollectorRegistry())
        servers.append(chat)
        settings = settings.with_service("chat", address=chat.address)
    except BaseException:
        for s in reversed(servers):
            await s.stop()
        await sim.stop()
        raise
    return FaultStack(
        settings=settings,
        database_url=database_url or settings.require_database_url(),
        sim=sim,
        models={"openai": openai, "anthropic": anthropic},
        make_token=make_token,
        workspaces_dir=workspaces_dir,
        chat=chat,
        servers=servers,
    )
