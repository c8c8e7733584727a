"""The gRPC servicer: thin conversion between protos and the domain (`workspaces`, `calls`)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import grpc.aio
from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2, toolexec_service_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2

from services.common.auth import current_identity
from services.common.errors import InvalidArgument
from services.toolexec.agent_hub import AgentHub
from services.toolexec.agent_store import AgentInfo, AgentStore
from services.toolexec.agent_tokens import agent_command
from services.toolexec.calls import ToolCaller
from services.toolexec.store import WorkspaceRecord
from services.toolexec.tools.definitions import TOOLS
from services.toolexec.workspaces import CreateSpec, WorkspaceManager

MAX_TOOLS_PAGE = 100
_STATES = {
    "creating": toolexec_pb2.WORKSPACE_STATE_CREATING,
    "ready": toolexec_pb2.WORKSPACE_STATE_READY,
    "failed": toolexec_pb2.WORKSPACE_STATE_FAILED,
}


def agent_to_proto(
    info: AgentInfo | None, live: bool, stale_after_seconds: float = 30.0
) -> toolexec_pb2.WorkspaceAgent:
    """The API form of an agent connection record (`live`: connected to this replica right now).

    A record not refreshed for `stale_after_seconds` was left by a replica that died: not connected.
    """
    if info is None:
        return toolexec_pb2.WorkspaceAgent(connected=live)
    last_seen = timestamp_pb2.Timestamp()
    last_seen.FromDatetime(info.last_seen)
    connect_time = timestamp_pb2.Timestamp()
    connect_time.FromDatetime(info.connect_time)
    fresh = (dt.datetime.now(dt.UTC) - info.last_seen).total_seconds() < stale_after_seconds
    return toolexec_pb2.WorkspaceAgent(
        connected=live or (info.connected and fresh),
        last_seen_time=last_seen,
        version=info.version,
        capabilities=list(info.capabilities),
        connect_time=connect_time,
    )


def workspace_to_proto(
    record: WorkspaceRecord, agent: toolexec_pb2.WorkspaceAgent | None = None
) -> toolexec_pb2.Workspace:
    """The API form of a workspace record."""
    create_time = timestamp_pb2.Timestamp()
    create_time.FromDatetime(record.create_time)
    update_time = timestamp_pb2.Timestamp()
    update_time.FromDatetime(record.update_time)
    return toolexec_pb2.Workspace(
        id=record.id,
        owner_id=record.owner_id,
        name=record.name,
        template_id=record.template_id,
        parameters=record.parameters,
        state=_STATES.get(record.state, toolexec_pb2.WORKSPACE_STATE_UNSPECIFIED),
        failure_message=record.failure_message,
        create_time=create_time,
        update_time=update_time,
        driver=record.driver,
        agent=agent,
    )


class ToolExecServicer(toolexec_service_pb2_grpc.ToolExecServiceServicer):
    """agentplane.toolexec.v1.ToolExecService."""

    def __init__(
        self,
        workspaces: WorkspaceManager,
        caller: ToolCaller,
        agents: AgentStore,
        hub: AgentHub,
        agent_url: Callable[[str], str],
        stale_after_seconds: float = 30.0,
    ) -> None:
        self._workspaces = workspaces
        self._caller = caller
        self._agents = agents
        self._hub = hub
        self._agent_url = agent_url
        self._stale_after = stale_after_seconds

    async def _with_agents(self, records: list[WorkspaceRecord]) -> list[toolexec_pb2.Workspace]:
        infos = await self._agents.get_many([r.id for r in records])
        return [
            workspace_to_proto(
                r, agent_to_proto(infos.get(r.id), self._hub.get(r.id) is not None, self._stale_after)
            )
            for r in records
        ]

    async def CreateWorkspace(
        self,
        request: toolexec_service_pb2.CreateWorkspaceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> toolexec_service_pb2.CreateWorkspaceResponse:
        spec = CreateSpec(
            name=request.name,
            owner_id=request.owner_id,
            template_id=request.template_id,
            parameters=dict(request.parameters),
            request_id=request.request_id,
            driver=request.driver,
        )
        created = await self._workspaces.create(current_identity(), spec)
        [workspace] = await self._with_agents([created.record])
        response = toolexec_service_pb2.CreateWorkspaceResponse(workspace=workspace)
        if created.agent_token and created.record.driver == "external":
            response.agent_token = created.agent_token
            response.agent_command = agent_command(
                self._agent_url(created.record.driver), created.record.id, created.agent_token
            )
        return response

    async def GetWorkspace(
        self, request: toolexec_service_pb2.GetWorkspaceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> toolexec_service_pb2.GetWorkspaceResponse:
        if request.view == toolexec_service_pb2.WORKSPACE_VIEW_BASIC:
            record = await self._workspaces.get(current_identity(), request.workspace_id, cached=True)
            return toolexec_service_pb2.GetWorkspaceResponse(workspace=workspace_to_proto(record))
        record = await self._workspaces.get(current_identity(), request.workspace_id)
        [workspace] = await self._with_agents([record])
        return toolexec_service_pb2.GetWorkspaceResponse(workspace=workspace)

    async def ListWorkspaces(
        self, request: toolexec_service_pb2.ListWorkspacesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> toolexec_service_pb2.ListWorkspacesResponse:
        records, token = await self._workspaces.list(
            current_identity(), request.owner_id, request.page_size, request.page_token
        )
        return toolexec_service_pb2.ListWorkspacesResponse(
            workspaces=await self._with_agents(records), next_page_token=token
        )

    async def RotateWorkspaceAgentToken(
        self,
        request: toolexec_service_pb2.RotateWorkspaceAgentTokenRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> toolexec_service_pb2.RotateWorkspaceAgentTokenResponse:
        record, token = await self._workspaces.rotate_token(current_identity(), request.workspace_id)
        return toolexec_service_pb2.RotateWorkspaceAgentTokenResponse(
            agent_token=token, agent_command=agent_command(self._agent_url(record.driver), record.id, token)
        )

    async def DeleteWorkspace(
        self,
        request: toolexec_service_pb2.DeleteWorkspaceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> toolexec_service_pb2.DeleteWorkspaceResponse:
        await self._workspaces.delete(current_identity(), request.workspace_id)
        return toolexec_service_pb2.DeleteWorkspaceResponse()

    async def ListTools(
        self, request: toolexec_service_pb2.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> toolexec_service_pb2.ListToolsResponse:
        current_identity()  # any authenticated caller may read the definitions
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(request.page_size or MAX_TOOLS_PAGE, MAX_TOOLS_PAGE)
        start = _decode_offset(request.page_token) if request.page_token else 0
        page = TOOLS[start : start + size]
        end = start + len(page)
        return toolexec_service_pb2.ListToolsResponse(
            tools=[
                toolexec_pb2.ToolDefinition(
                    name=t.name, description=t.description, input_schema_json=t.schema_json
                )
                for t in page
            ],
            next_page_token=_encode_offset(end) if end < len(TOOLS) else "",
        )

    async def CallTool(
        self, request: toolexec_service_pb2.CallToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> toolexec_service_pb2.CallToolResponse:
        timeout = None
        if request.HasField("timeout"):
            # Not ToTimedelta(): a Duration beyond timedelta's range (any int64 seconds can arrive)
            # would overflow; the caller bounds the time by the tool's own limit anyway.
            timeout = request.timeout.seconds + request.timeout.nanos / 1e9
        outcome = await self._caller.call(
            current_identity(),
            request.workspace_id,
            request.tool_call_id,
            request.name,
            request.arguments_json,
            timeout,
        )
        result = outcome.result
        duration = duration_pb2.Duration()
        duration.FromNanoseconds(int(outcome.duration_seconds * 1e9))
        return toolexec_service_pb2.CallToolResponse(
            content=result.content,
            structured_json=_json(result.structured),
            is_error=result.is_error,
            replayed=outcome.replayed,
            duration=duration,
        )


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _encode_offset(offset: int) -> str:
    return base64.urlsafe_b64encode(f"tools:{offset}".encode()).decode()


def _decode_offset(token: str) -> int:
    try:
        kind, _, raw = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token", "is not a token from a previous ListTools response") from None
    if kind != "tools" or offset < 0:
        raise InvalidArgument("page_token", "is not a token from a previous ListTools response")
    return offset
