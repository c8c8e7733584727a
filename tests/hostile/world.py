"""A whole deployment in-process with two users' worth of data, for the hostile-input suites.

`start_world` runs the simulator and the four services' real servers (config, inference, toolexec,
chat) on one database, then seeds, through the public RPCs:

- as the admin: an enabled provider and default model on the simulator, a disabled model, an
  enabled and a disabled workspace template;
- for alice and for bob each: a workspace, an idle chat with a finished turn, and a busy chat whose
  model reply is held at a simulator gate with one message queued behind it; alice's user prompt.

Every name and text of alice's carries ``SECRET`` so a test can tell whether an error shown to
someone else gave any of it away. Workspaces use the external driver unless a test asks for local
ones: the suites create many and need no agent process behind them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from prometheus_client import CollectorRegistry

from services.chat import server as chat_server
from services.chat.settings import ChatSettings
from services.common import auth
from services.common.client import create_channel
from services.common.server import ServerHandle
from services.common.settings import Settings
from services.config import server as config_server
from services.config.testing import seed_provider_and_model
from services.inference import server as inference_server
from services.inference.settings import InferenceSettings
from services.simulator.script import Script
from services.simulator.server import SimulatorHandle, start_simulator
from services.toolexec import server as toolexec_server
from services.toolexec.settings import ToolexecSettings
from tests.helpers import wait_until

SECRET = "SECRET"
HOLD_GATE = "hold"
HOLD_PROMPT = "hold-me"
SIM_KEY = "sk-hostile-sim-key-0123456789"
CHAT_SETTINGS = ChatSettings(
    max_concurrent_chats=16,
    lease_seconds=3.0,
    renew_interval_seconds=0.5,
    poll_interval_seconds=0.5,
    sweep_interval_seconds=0.5,
    delta_flush_ms=20,
)
# Provider failures are retried quickly: the suites provoke them on purpose.
INFERENCE_SETTINGS = InferenceSettings(
    coalesce_ms=20, max_attempts=2, retry_base_ms=10, retry_max_delay_ms=50, retry_budget_s=5
)
SERVICES = ("config", "inference", "toolexec", "chat")


def text(value: str) -> list[chat_pb2.ContentPart]:
    """Content of one text part."""
    return [chat_pb2.ContentPart(text=chat_pb2.TextPart(text=value))]


@dataclass
class UserData:
    """What one user owns in the world."""

    name: str
    workspace_id: str = ""
    workspace_name: str = ""
    chat_id: str = ""
    chat_title: str = ""
    user_message_id: str = ""
    assistant_message_id: str = ""
    busy_chat_id: str = ""
    queued_message_id: str = ""
    secrets: list[str] = field(default_factory=list)


@dataclass(repr=False)
class World:
    """The running deployment, its seeded ids, and channels to each service as anyone."""

    settings: Settings
    sim: SimulatorHandle
    make_token: Callable[..., str]
    handles: dict[str, ServerHandle]
    stoppers: list[Any]
    provider_id: str = ""
    model_id: str = ""
    disabled_model_id: str = ""
    disabled_model_name: str = ""
    template_id: str = ""
    disabled_template_id: str = ""
    disabled_template_name: str = ""
    users: dict[str, UserData] = field(default_factory=dict)
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def __repr__(self) -> str:  # what a failing example prints: short
        return f"World({', '.join(f'{n}={h.address}' for n, h in self.handles.items())})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints with this
        printer.text(repr(self))

    def address(self, service: str) -> str:
        """`127.0.0.1:<port>` of a service."""
        return self.handles[service].address

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to `service` without credentials (callers send their own metadata); no retries."""
        channel = self._channels.get(service)
        if channel is None:
            channel = create_channel(self.address(service), retries=False)
            self._channels[service] = channel
        return channel

    def metadata(self, subject: str, role: str = "user", acting_for: str = "") -> list[tuple[str, str]]:
        """Call metadata of `subject` (a service acting for `acting_for` when given)."""
        md = [(auth.AUTHORIZATION_METADATA_KEY, f"Bearer {self.make_token(subject, role)}")]
        if acting_for:
            md.append((auth.ON_BEHALF_OF_METADATA_KEY, acting_for))
        return md

    def chat(self, user: str) -> chat_service_pb2_grpc.ChatServiceStub:
        """A ChatService stub authenticated as `user` (a channel of its own)."""
        return chat_service_pb2_grpc.ChatServiceStub(self._user_channel("chat", user))

    def toolexec(self, user: str) -> toolexec_service_pb2_grpc.ToolExecServiceStub:
        """A ToolExecService stub authenticated as `user`."""
        return toolexec_service_pb2_grpc.ToolExecServiceStub(self._user_channel("toolexec", user))

    def config(self, user: str, role: str = "user") -> config_service_pb2_grpc.ConfigServiceStub:
        """A ConfigService stub authenticated as `user` with `role`."""
        return config_service_pb2_grpc.ConfigServiceStub(self._user_channel("config", user, role))

    def _user_channel(self, service: str, user: str, role: str = "user") -> grpc.aio.Channel:
        key = f"{service}/{user}/{role}"
        channel = self._channels.get(key)
        if channel is None:
            channel = create_channel(self.address(service), token=self.make_token(user, role))
            self._channels[key] = channel
        return channel

    def known_strings(self) -> list[str]:
        """Every id and name the world made: fuzzed requests use them to get past lookups."""
        values = [
            self.provider_id,
            self.model_id,
            self.disabled_model_id,
            self.template_id,
            self.disabled_template_id,
            self.disabled_template_name,
            "tmpl-open",
            "alice",
            "bob",
            "admin",
            "service:chat",
            "external",
            "read_file",
            "write_file",
            "execute",
        ]
        for user in self.users.values():
            values += [
                user.workspace_id,
                user.chat_id,
                user.user_message_id,
                user.assistant_message_id,
                user.busy_chat_id,
                user.queued_message_id,
            ]
        return [v for v in values if v]

    async def agent_connected(self, user: str, workspace_id: str) -> None:
        """Wait until the workspace's agent is connected (a local workspace's starts with it)."""
        await wait_until(
            lambda: self.toolexec(user).GetWorkspace(
                toolexec_service_pb2.GetWorkspaceRequest(workspace_id=workspace_id)
            ),
            until=lambda r: r.workspace.agent.connected,
            what=f"the agent of {workspace_id} to connect",
            timeout=30,
        )

    async def release(self) -> None:
        """Let every held model reply finish."""
        await self.sim.open_gate(HOLD_GATE)

    async def stop(self) -> None:
        """Stop every server (chat first) and the simulator."""
        for channel in self._channels.values():
            await channel.close()
        await self.sim.open_gate(HOLD_GATE)
        for stop in reversed(self.stoppers):
            await stop()
        await self.sim.stop()


async def start_world(
    settings: Settings,
    make_token: Callable[..., str],
    workspaces_dir: str,
    *,
    default_driver: str = "external",
    seed_users: bool = True,
) -> World:
    """Start the deployment and seed it: the admin's config always, the users' data if `seed_users`."""
    sim = await start_simulator(expected_api_key=SIM_KEY)
    sim.set_script(
        Script.from_data(
            {"conversations": [{"match": HOLD_PROMPT, "turns": [{"text": "held reply", "gate": HOLD_GATE}]}]}
        )
    )
    stoppers: list[Any] = []
    handles: dict[str, ServerHandle] = {}
    try:
        channel = f"hostile:config:{uuid.uuid4().hex}"
        config = await config_server.start(settings, channel=channel, registry=CollectorRegistry())
        stoppers.append(config.stop)
        handles["config"] = config.handle
        settings = settings.with_service("config", address=config.address)
        inference = await inference_server.start(settings, INFERENCE_SETTINGS)
        stoppers.append(inference.stop)
        handles["inference"] = inference
        settings = settings.with_service("inference", address=inference.address)
        toolexec = await toolexec_server.start(
            settings,
            # A call to an external workspace (no agent behind it) waits this long for the agent;
            # a local one's agent is started by toolexec, which may take a few seconds under load.
            toolexec_settings=ToolexecSettings(
                workspaces_dir=workspaces_dir,
                default_driver=default_driver,
                offline_wait_seconds=1.0 if default_driver == "external" else 10.0,
            ),
        )
        stoppers.append(toolexec.stop)
        handles["toolexec"] = toolexec.handle
        settings = settings.with_service("toolexec", address=toolexec.address)
        chat = await chat_server.start(settings, CHAT_SETTINGS, registry=CollectorRegistry())
        stoppers.append(chat.stop)
        handles["chat"] = chat.handle
        settings = settings.with_service("chat", address=chat.address)
    except BaseException:
        for stop in reversed(stoppers):
            await stop()
        await sim.stop()
        raise
    world = World(settings, sim, make_token, handles, stoppers)
    try:
        await _seed(world, seed_users)
    except BaseException:
        await world.stop()
        raise
    return world


async def _seed(world: World, users: bool) -> None:
    admin = world.config("admin", "admin")
    world.provider_id, world.model_id = await seed_provider_and_model(
        world.address("config"),
        world.make_token("admin", "admin"),
        provider_type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
        base_url=world.sim.openai_base_url,
        api_key=SIM_KEY,
        model_name="sim-model",
    )
    world.disabled_model_name = f"{SECRET}-disabled-model"
    disabled = await admin.CreateModelConfig(
        config_service_pb2.CreateModelConfigRequest(
            model_config=config_pb2.ModelConfig(
                provider_id=world.provider_id,
                model_name=world.disabled_model_name,
                display_name=world.disabled_model_name,
                enabled=False,
                context_limit=1000,
            )
        )
    )
    world.disabled_model_id = disabled.model_config.id
    source = config_pb2.TemplateSource(directory=config_pb2.DirectorySource(path="/nonexistent"))
    opened = await admin.CreateWorkspaceTemplate(
        config_service_pb2.CreateWorkspaceTemplateRequest(
            workspace_template=config_pb2.WorkspaceTemplate(
                name="tmpl-open", description="an open template", source=source, enabled=True
            )
        )
    )
    world.template_id = opened.workspace_template.id
    world.disabled_template_name = "tmpl-hidden"
    hidden = await admin.CreateWorkspaceTemplate(
        config_service_pb2.CreateWorkspaceTemplateRequest(
            workspace_template=config_pb2.WorkspaceTemplate(
                name=world.disabled_template_name,
                description=f"{SECRET} template description",
                source=source,
                enabled=False,
            )
        )
    )
    world.disabled_template_id = hidden.workspace_template.id
    for name in ("alice", "bob") if users else ():
        world.users[name] = await _seed_user(world, name)


async def _seed_user(world: World, name: str) -> UserData:
    user = UserData(name)
    user.workspace_name = f"{name}-{SECRET}-workspace"
    toolexec = world.toolexec(name)
    created = await toolexec.CreateWorkspace(
        toolexec_service_pb2.CreateWorkspaceRequest(name=user.workspace_name)
    )
    user.workspace_id = created.workspace.id
    await world.config(name).UpdateUserPrompt(
        config_service_pb2.UpdateUserPromptRequest(text=f"{name} {SECRET} user prompt")
    )
    stub = world.chat(name)
    user.chat_title = f"{name} {SECRET} title"
    prompt = f"{name} {SECRET} first message"
    # No workspace: an external one has no agent behind it, and the loop would wait for one.
    resp = await stub.CreateChat(
        chat_service_pb2.CreateChatRequest(content=text(prompt), title=user.chat_title)
    )
    user.chat_id = resp.chat.id
    user.user_message_id = resp.message.id
    await wait_until(
        lambda: stub.GetChat(chat_service_pb2.GetChatRequest(chat_id=user.chat_id)),
        until=lambda r: r.chat.status == chat_pb2.CHAT_STATUS_WAITING,
        what=f"{name}'s first chat to finish its turn",
    )
    listed = await stub.ListMessages(chat_service_pb2.ListMessagesRequest(chat_id=user.chat_id))
    user.assistant_message_id = next(
        m.id for m in listed.messages if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT
    )
    held_before = world.sim.gate(HOLD_GATE).held
    busy = await stub.CreateChat(
        chat_service_pb2.CreateChatRequest(
            content=text(f"{HOLD_PROMPT} {name} {SECRET} busy"), title=f"{name} {SECRET} busy"
        )
    )
    user.busy_chat_id = busy.chat.id
    await world.sim.wait_held(HOLD_GATE, count=held_before + 1)
    queued = await stub.SendMessage(
        chat_service_pb2.SendMessageRequest(
            chat_id=user.busy_chat_id,
            content=text(f"{name} {SECRET} queued"),
            busy_behavior=chat_pb2.BUSY_BEHAVIOR_QUEUE,
        )
    )
    user.queued_message_id = queued.queued_message.id
    assert user.queued_message_id, "the busy chat did not queue the message"
    user.secrets = [user.workspace_name, user.chat_title, prompt, f"{name} {SECRET}", SECRET]
    return user
