"""CreateWorkspace with a template from the real config service (both servers in-process)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2, toolexec_service_pb2_grpc

from services.common.client import create_channel
from services.common.settings import Settings
from services.config import server as config_server
from services.toolexec import server as toolexec_server
from services.toolexec.settings import ToolexecSettings
from tests.toolexec.test_workspaces import _make_repo


async def test_templates_from_config_service(
    settings: Settings,
    tx_settings: ToolexecSettings,
    make_token: Callable[..., str],
    admin_token: str,
    tmp_path: Path,
) -> None:
    config = await config_server.start(settings, channel=f"config-test-{uuid.uuid4().hex}")
    tx = await toolexec_server.start(
        settings.with_service("config", address=config.address), toolexec_settings=tx_settings
    )
    admin = create_channel(config.address, token=admin_token)
    user = create_channel(tx.address, token=make_token("alice"))
    try:
        source = tmp_path / "tpl"
        source.mkdir()
        (source / "AGENTS.md").write_text("Run the tests with make test.\n")
        _make_repo(tmp_path / "repos" / "app")
        cfg = config_service_pb2_grpc.ConfigServiceStub(admin)
        await cfg.CreateWorkspaceTemplate(
            config_service_pb2.CreateWorkspaceTemplateRequest(
                workspace_template=config_pb2.WorkspaceTemplate(
                    name="starter",
                    description="a directory",
                    enabled=True,
                    source=config_pb2.TemplateSource(directory=config_pb2.DirectorySource(path=str(source))),
                )
            )
        )
        await cfg.CreateWorkspaceTemplate(
            config_service_pb2.CreateWorkspaceTemplateRequest(
                workspace_template=config_pb2.WorkspaceTemplate(
                    name="repo",
                    description="a git repository",
                    enabled=True,
                    parameters=[config_pb2.TemplateParameter(name="name", required=True)],
                    source=config_pb2.TemplateSource(
                        git=config_pb2.GitSource(url=str(tmp_path / "repos") + "/{name}", ref="v1")
                    ),
                )
            )
        )
        stub = toolexec_service_pb2_grpc.ToolExecServiceStub(user)
        ws = (
            await stub.CreateWorkspace(
                toolexec_service_pb2.CreateWorkspaceRequest(name="a", template_id="starter")
            )
        ).workspace
        assert ws.state == toolexec_pb2.WORKSPACE_STATE_READY, ws.failure_message
        # How the chat service reads AGENTS.md: a read_file call with an id of its choosing.
        r = await stub.CallTool(
            toolexec_service_pb2.CallToolRequest(
                workspace_id=ws.id,
                tool_call_id="agents-md",
                name="read_file",
                arguments_json='{"path":"AGENTS.md"}',
            )
        )
        assert r.content == "     1\tRun the tests with make test."
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateWorkspace(
                toolexec_service_pb2.CreateWorkspaceRequest(name="b", template_id="repo")
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameters.name" in (info.value.details() or "")
        cloned = (
            await stub.CreateWorkspace(
                toolexec_service_pb2.CreateWorkspaceRequest(
                    name="b", template_id="repo", parameters={"name": "app"}
                )
            )
        ).workspace
        assert cloned.state == toolexec_pb2.WORKSPACE_STATE_READY, cloned.failure_message
        r = await stub.CallTool(
            toolexec_service_pb2.CallToolRequest(
                workspace_id=cloned.id,
                tool_call_id="c1",
                name="read_file",
                arguments_json='{"path":"README.md"}',
            )
        )
        assert r.content == "     1\tv1"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateWorkspace(
                toolexec_service_pb2.CreateWorkspaceRequest(name="c", template_id="missing")
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await admin.close()
        await user.close()
        await tx.stop()
        await config.stop()
