"""Pooled connections broken by a database restart are replaced before a request meets them.

A restart of Postgres terminates every backend; the pools' idle connections then point at dead
sessions. The test does to its own database what a restart does (`pg_terminate_backend` on every
session but its own, waiting until each has exited) without stopping the shared server, then calls
real RPCs of config, toolexec and chat through their gRPC servers: each must succeed at once.
"""

from __future__ import annotations

import json
import uuid

import grpc
import psycopg
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2
from agentplane.config.v1 import config_service_pb2, config_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_service_pb2

from services.common.client import create_channel
from tests.chat.conftest import Stack, text


async def terminate_sessions(database_url: str) -> int:
    """Terminate every other session of the test's database (what a restart does to a pool) and wait
    until they have exited; returns how many there were."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pg_terminate_backend(pid, 10000) AS gone FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        rows = await cur.fetchall()
    assert all(gone for (gone,) in rows), "a terminated session did not exit within 10 s"
    return len(rows)


async def call_every_service(stack: Stack, chat_id: str, workspace_id: str, model_config_id: str) -> None:
    """Read-only and writing RPCs of config, toolexec and chat that each need the database."""
    channel = create_channel(stack.settings.address("config"), token=stack.make_token("admin", "admin"))
    try:
        config = config_service_pb2_grpc.ConfigServiceStub(channel)
        resolved = await config.ResolveModel(
            config_service_pb2.ResolveModelRequest(model_config_id=model_config_id), timeout=10
        )
        assert resolved.model_config.id == model_config_id
        providers = await config.ListProviders(config_service_pb2.ListProvidersRequest(), timeout=10)
        assert len(providers.providers) == 1
    finally:
        await channel.close()

    toolexec = stack.toolexec()
    got = await toolexec.GetWorkspace(
        toolexec_service_pb2.GetWorkspaceRequest(
            workspace_id=workspace_id, view=toolexec_service_pb2.WORKSPACE_VIEW_FULL
        ),
        timeout=10,
    )
    assert got.workspace.id == workspace_id
    called = await toolexec.CallTool(
        toolexec_service_pb2.CallToolRequest(
            workspace_id=workspace_id,
            tool_call_id=f"call_{uuid.uuid4().hex[:12]}",
            name="execute",
            arguments_json=json.dumps({"command": "echo still-here"}),
        ),
        timeout=30,
    )
    assert not called.is_error, called.content
    assert "still-here" in called.content
    created = await toolexec.CreateWorkspace(
        toolexec_service_pb2.CreateWorkspaceRequest(name=f"ws-{uuid.uuid4().hex[:8]}"), timeout=30
    )
    assert created.workspace.id

    chat = await stack.chat_of(chat_id)
    assert chat.id == chat_id
    messages = await stack.messages(chat_id)
    assert messages


@pytest.mark.timeout(120)
async def test_requests_after_every_session_was_terminated_succeed(stack: Stack) -> None:
    workspace_id = await stack.workspace()
    created = await stack.stub().CreateChat(
        chat_service_pb2.CreateChatRequest(content=text("hello"), workspace_id=workspace_id)
    )
    chat_id = created.chat.id
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    # Every pool now holds connections that served requests.
    await call_every_service(stack, chat_id, workspace_id, stack.model_config_id)

    for _ in range(2):  # the replacements must be replaceable too
        assert await terminate_sessions(stack.settings.require_database_url()) >= 3
        try:
            await call_every_service(stack, chat_id, workspace_id, stack.model_config_id)
        except grpc.aio.AioRpcError as exc:
            pytest.fail(f"a request after the restart failed: {exc.code().name}: {exc.details()}")
