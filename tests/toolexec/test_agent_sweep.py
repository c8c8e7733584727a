"""A workspace left CREATING by a crash is failed by the sweep; a fresh CREATING one is left alone."""

from __future__ import annotations

import uuid

import grpc
import grpc.aio
import psycopg
import pytest
from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2

from tests.toolexec.conftest import Toolexec, call_request


def _workspace_id() -> str:
    return "ws_" + uuid.uuid4().hex[:20]


async def test_sweep_fails_workspaces_left_creating(toolexec: Toolexec, database_url: str) -> None:
    stale, fresh = _workspace_id(), _workspace_id()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO toolexec_workspaces (id, owner_id, name, state, create_time, update_time) "
            "VALUES (%s, 'alice', 'stuck', 'creating', now() - interval '1 hour', now() - interval '1 hour')",
            (stale,),
        )
        await conn.execute(
            "INSERT INTO toolexec_workspaces (id, owner_id, name, state) "
            "VALUES (%s, 'alice', 'being-made', 'creating')",
            (fresh,),
        )

    swept = await toolexec.server.workspaces.sweep_creating(60)
    assert swept == [stale]

    stub = toolexec.stub("alice")
    got = (await stub.GetWorkspace(toolexec_service_pb2.GetWorkspaceRequest(workspace_id=stale))).workspace
    assert got.state == toolexec_pb2.WORKSPACE_STATE_FAILED
    assert got.failure_message and "interrupted" in got.failure_message
    # update_time moved on (it is the moment it failed).
    assert got.update_time.ToDatetime() > got.create_time.ToDatetime()

    still = (await stub.GetWorkspace(toolexec_service_pb2.GetWorkspaceRequest(workspace_id=fresh))).workspace
    assert still.state == toolexec_pb2.WORKSPACE_STATE_CREATING and not still.failure_message

    # Sweeping again changes nothing; tools refuse the failed workspace with its reason.
    assert await toolexec.server.workspaces.sweep_creating(60) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CallTool(call_request(stale, "execute", {"command": "true"}))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not ready" in (err.value.details() or "") and "interrupted" in (err.value.details() or "")
