"""Routing a tool call to the workspace's agent, wherever it is connected.

Connected to this replica: straight over its link. Connected to another replica: relayed
there (`AgentRelayService.RelayToolCall`, with toolexec's service token). Not connected: the
driver is asked to start it (drivers that can), and the call waits a bounded time for it;
then it returns an error result the model can act on ("the workspace is offline"), never a
hang. A call that reached an agent whose connection was then lost for good says that its
outcome is unknown.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Protocol

import grpc
import grpc.aio
from agentplane.toolexec.v1 import error_reason_pb2 as reasons
from agentplane.toolexec.v1 import workspace_agent_service_pb2 as pb
from agentplane.toolexec.v1 import workspace_agent_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2

from services.agent.tools.base import ToolError, ToolResult
from services.common import tracing
from services.common.client import create_channel
from services.common.rpc_errors import error_info, reason_of
from services.toolexec.agent_hub import AgentHub, AgentTimedOut, AgentUnreachable
from services.toolexec.agent_store import AgentInfo, AgentStore

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
RELAY_MARGIN_SECONDS = 60.0
DEFAULT_RELAY_SECONDS = 4 * 3600.0


class AgentStarter(Protocol):
    """What the router needs of a driver: start the workspace's agent if it can."""

    async def ensure_agent(self, workspace_id: str) -> None:
        """Start the agent if it is not running (no-op for drivers that cannot)."""


class AgentOutcomeUnknown(Exception):
    """The call reached an agent, and the connection was lost before its result came back."""


class AgentOffline(Exception):
    """No agent of the workspace connected within the wait."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def offline_result(message: str) -> ToolResult:
    """The error result for a workspace whose agent is not connected."""
    return ToolError(message, code="workspace_offline").to_result()


def unknown_outcome_result(name: str) -> ToolResult:
    """The error result for a call whose connection to the agent was lost mid-call."""
    return ToolError(
        f"the connection to the workspace agent was lost while this {name} call ran, so its outcome is "
        "unknown: the command may have run, fully or in part. Check the workspace (for example with "
        "read_file or execute) before repeating it; repeating the same tool call id answers from the "
        "agent's record once it is back.",
        code="outcome_unknown",
    ).to_result()


def result_from_agent(message: pb.AgentToolResult) -> ToolResult:
    """The agent's result as a ToolResult."""
    try:
        structured = json.loads(message.structured_json) if message.structured_json else {}
    except ValueError:
        structured = {}
    if not isinstance(structured, dict):
        structured = {"value": structured}
    return ToolResult(content=message.content, structured=structured, is_error=message.is_error)


class AgentRouter:
    """Sends calls to agents: here, on another replica, or after starting them."""

    def __init__(
        self,
        hub: AgentHub,
        agents: AgentStore,
        starter: AgentStarter,
        token_provider: Callable[[], str],
        *,
        offline_wait_seconds: float = 10.0,
        reconnect_grace_seconds: float = 15.0,
        stale_after_seconds: float = 30.0,
    ) -> None:
        self._hub = hub
        self._agents = agents
        self._starter = starter
        self._token = token_provider
        self.offline_wait = offline_wait_seconds
        self.reconnect_grace = reconnect_grace_seconds
        self.stale_after = stale_after_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def call(
        self,
        workspace_id: str,
        tool_call_id: str,
        name: str,
        arguments_json: str,
        arguments_sha256: str,
        timeout_seconds: float | None,
        deadline_seconds: float | None = None,
    ) -> ToolResult:
        """Run one validated call on the workspace's agent; raises AgentOffline / AgentOutcomeUnknown.

        `deadline_seconds` bounds the wait for a result once the call is with an agent.
        """
        attributes = {"agentplane.tool": name, "agentplane.workspace_id": workspace_id}
        with tracing.span(f"toolexec.agent {name}", kind=tracing.CLIENT, attributes=attributes):
            message = pb.AgentToolCall(
                tool_call_id=tool_call_id,
                name=name,
                arguments_json=arguments_json,
                arguments_sha256=arguments_sha256,
            )
            # The agent's span of the call (and a relaying replica's) joins this trace.
            tracing.inject(message.trace_context)
            return await self._send(workspace_id, message, timeout_seconds, deadline_seconds)

    async def _send(
        self,
        workspace_id: str,
        message: pb.AgentToolCall,
        timeout_seconds: float | None,
        deadline_seconds: float | None,
    ) -> ToolResult:
        if timeout_seconds is not None:
            timeout = duration_pb2.Duration()
            timeout.FromNanoseconds(int(timeout_seconds * 1e9))
            message.timeout.CopyFrom(timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.offline_wait
        sent = False
        extended = False
        info: AgentInfo | None = None
        while True:
            if self._hub.get(workspace_id) is not None:
                try:
                    return result_from_agent(
                        await self._hub.call(
                            workspace_id, message, self.reconnect_grace, deadline_seconds=deadline_seconds
                        )
                    )
                except AgentUnreachable as exc:
                    sent = sent or exc.sent
                except AgentTimedOut:
                    raise AgentOutcomeUnknown(workspace_id) from None
            else:
                info = await self._agents.get(workspace_id)
                if self._elsewhere(info):
                    assert info is not None
                    relayed = await self._relay(info, workspace_id, message, deadline_seconds)
                    if isinstance(relayed, ToolResult):
                        return relayed
                    sent = sent or relayed
            if sent and not extended:
                # It may have run: wait for the agent to come back (anywhere) within the grace.
                extended = True
                deadline = max(deadline, loop.time() + self.reconnect_grace)
            remaining = deadline - loop.time()
            if remaining <= 0:
                if sent:
                    raise AgentOutcomeUnknown(workspace_id)
                raise AgentOffline(_offline_message(workspace_id, info, self.offline_wait))
            # Every round: an agent that was just exiting (a rotated token) is gone by the next one.
            await self._starter.ensure_agent(workspace_id)
            await self._hub.wait_for_link(workspace_id, min(POLL_SECONDS, remaining))

    def _elsewhere(self, info: AgentInfo | None) -> bool:
        """True when the record says the agent is connected to another replica that is alive."""
        if info is None or not info.connected or info.replica_id == self._hub.replica_id:
            return False
        # A replica refreshes last_seen of its agents every heartbeat; a row older than that is
        # left by a replica that died without saying so.
        age = (dt.datetime.now(dt.UTC) - info.last_seen).total_seconds()
        return age < self.stale_after

    async def _relay(
        self, info: AgentInfo, workspace_id: str, message: pb.AgentToolCall, deadline_seconds: float | None
    ) -> ToolResult | bool:
        """The result from the replica holding the agent, or whether the call may have been sent."""
        stub = pb_grpc.AgentRelayServiceStub(self._channel(info.replica_address))
        deadline = (deadline_seconds or DEFAULT_RELAY_SECONDS) + RELAY_MARGIN_SECONDS
        try:
            response = await stub.RelayToolCall(
                pb.RelayToolCallRequest(workspace_id=workspace_id, call=message), timeout=deadline
            )
        except grpc.aio.AioRpcError as exc:
            log.info(
                "relay to replica %s failed: %s %s",
                info.replica_id,
                exc.code().name,
                exc.details(),
                extra={"workspace_id": workspace_id},
            )
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(exc) is not None:
                return reason_of(exc, reasons.ErrorReason) == reasons.ERROR_REASON_AGENT_LOST_AFTER_SEND
            # The replica died or is unreachable mid-call: the call may have reached the agent.
            return True
        return result_from_agent(response.result)

    async def signal(self, workspace_id: str, kind: pb.AgentSignalKind.ValueType, reason: str) -> bool:
        """Signal the workspace's agent wherever it is connected; False when it is not connected."""
        if self._hub.signal(workspace_id, kind, reason):
            return True
        info = await self._agents.get(workspace_id)
        if info is None or not self._elsewhere(info):
            return False
        try:
            response = await pb_grpc.AgentRelayServiceStub(self._channel(info.replica_address)).RelaySignal(
                pb.RelaySignalRequest(
                    workspace_id=workspace_id, signal=pb.AgentSignal(kind=kind, reason=reason)
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.delivered)

    def _channel(self, address: str) -> grpc.aio.Channel:
        """The channel to another replica (one per address, kept), with toolexec's service token."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = create_channel(address, token_provider=self._token)
        return channel

    async def close(self) -> None:
        """Close the relay channels."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _offline_message(workspace_id: str, info: AgentInfo | None, waited: float) -> str:
    if info is None:
        seen = "its agent has never connected"
    else:
        ago = (dt.datetime.now(dt.UTC) - info.last_seen).total_seconds()
        seen = f"its agent was last seen {_ago(ago)} ago"
    return (
        f"the workspace is offline: {seen}, and none connected within {waited:g} s, so nothing was run. "
        "Tell the user the workspace's agent must be running (for an external workspace, the command "
        "shown at creation or by `agentplane workspace rotate-token`), then try again."
    )


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0, int(seconds))} s"
    if seconds < 7200:
        return f"{int(seconds // 60)} min"
    return f"{seconds / 3600:.1f} h"
