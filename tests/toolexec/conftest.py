"""Fixtures for toolexec tests: a real toolexec server (in-process, port 0) on a tmp workspaces dir."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc.aio
import pytest
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc

from services.common.client import create_channel
from services.common.errors import NotFound
from services.common.settings import Settings
from services.toolexec import server as toolexec_server
from services.toolexec.settings import ToolexecSettings
from services.toolexec.templates import Template


class StaticTemplates:
    """A `TemplateFetcher` over a fixed dict (tests that do not need the config service)."""

    def __init__(self, templates: dict[str, Template] | None = None) -> None:
        self.templates = templates or {}

    async def fetch(self, id_or_name: str) -> Template:
        for t in self.templates.values():
            if id_or_name in (t.id, t.name):
                return t
        raise NotFound(f"workspace template {id_or_name} not found", reason="WORKSPACE_TEMPLATE_NOT_FOUND")


@dataclass
class Toolexec:
    """A running toolexec and a way to talk to it as different callers."""

    server: toolexec_server.ToolexecServer
    workspaces_dir: str
    make_token: Callable[..., str]
    templates: StaticTemplates
    _channels: list[grpc.aio.Channel]

    def stub(
        self, subject: str = "alice", role: str = "user"
    ) -> toolexec_service_pb2_grpc.ToolExecServiceStub:
        """A stub authenticated as `subject`."""
        channel = create_channel(self.server.address, token=self.make_token(subject, role))
        self._channels.append(channel)
        return toolexec_service_pb2_grpc.ToolExecServiceStub(channel)

    async def create(self, owner: str = "alice", name: str = "ws") -> str:
        """Create an empty workspace owned by `owner`; returns its id."""
        resp = await self.stub(owner).CreateWorkspace(toolexec_service_pb2.CreateWorkspaceRequest(name=name))
        return str(resp.workspace.id)


def call_request(
    workspace_id: str, name: str, args: dict[str, Any] | str, call_id: str | None = None
) -> toolexec_service_pb2.CallToolRequest:
    """A CallToolRequest with a fresh tool_call_id unless one is given."""
    return toolexec_service_pb2.CallToolRequest(
        workspace_id=workspace_id,
        tool_call_id=call_id or f"call_{uuid.uuid4().hex[:12]}",
        name=name,
        arguments_json=args if isinstance(args, str) else json.dumps(args),
    )


@pytest.fixture
def tx_settings(workspaces_dir: str) -> ToolexecSettings:
    """Toolexec settings on the test's workspaces dir."""
    return ToolexecSettings(workspaces_dir=workspaces_dir)


@pytest.fixture
async def toolexec(
    settings: Settings, tx_settings: ToolexecSettings, make_token: Callable[..., str]
) -> AsyncIterator[Toolexec]:
    """A started toolexec server (real Postgres, real gRPC) with static templates."""
    templates = StaticTemplates()
    server = await toolexec_server.start(settings, toolexec_settings=tx_settings, templates=templates)
    channels: list[grpc.aio.Channel] = []
    try:
        yield Toolexec(server, tx_settings.workspaces_dir, make_token, templates, channels)
    finally:
        for channel in channels:
            await channel.close()
        await server.stop(0)


def ws_path(tx: Toolexec, workspace_id: str, rel: str = "") -> str:
    """The host path of `rel` inside a workspace."""
    return os.path.join(tx.workspaces_dir, workspace_id, rel)


def ws_write(tx: Toolexec, workspace_id: str, rel: str, data: str | bytes) -> str:
    """Write a file into a workspace directly on disk, owned by the workspace user; returns its path."""
    path = ws_path(tx, workspace_id, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    ws_own(tx, workspace_id)
    return path


def ws_own(tx: Toolexec, workspace_id: str) -> None:
    """Give everything in the workspace to the workspace user (files a test made as root)."""
    sandbox = tx.server.driver.sandbox
    if not sandbox.drops_privileges():
        return
    uid, gid = sandbox.ids_for(workspace_id)
    root = ws_path(tx, workspace_id)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, gid)
    os.lchown(root, uid, gid)


def ws_read(tx: Toolexec, workspace_id: str, rel: str) -> str:
    """Read a workspace file directly from disk."""
    with open(ws_path(tx, workspace_id, rel)) as f:
        return f.read()


def ws_exists(tx: Toolexec, workspace_id: str, rel: str = "") -> bool:
    """Whether a path exists in a workspace (or the workspace directory itself, for rel='')."""
    return os.path.lexists(ws_path(tx, workspace_id, rel))
