"""gRPC glue for workspace agents: `WorkspaceAgentService.Connect` and the replicas' relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from agentplane.toolexec.v1 import workspace_agent_service_pb2 as pb
from agentplane.toolexec.v1 import workspace_agent_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2

from services.common import auth
from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from services.common.interceptors import metadata_value
from services.toolexec.agent_hub import AgentHub, AgentLink, AgentUnreachable
from services.toolexec.agent_store import AgentStore
from services.toolexec.agent_tokens import token_sha256
from services.toolexec.store import WorkspaceStore

log = logging.getLogger(__name__)

HELLO_TIMEOUT_SECONDS = 10.0
MAX_RUNNING_IDS = 10_000
MAX_VERSION_LENGTH = 64
MAX_CAPABILITIES = 64
MAX_CAPABILITY_LENGTH = 64


class WorkspaceAgentServicer(pb_grpc.WorkspaceAgentServiceServicer):
    """Accepts agent connections: token -> workspace, hello, then the link's outbox and results."""

    def __init__(
        self,
        hub: AgentHub,
        workspaces: WorkspaceStore,
        agents: AgentStore,
        replica_address: str,
        heartbeat_seconds: float,
    ) -> None:
        self._hub = hub
        self._workspaces = workspaces
        self._agents = agents
        self.replica_address = replica_address
        self._heartbeat = heartbeat_seconds

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ConnectResponse]:
        token = auth.parse_authorization(metadata_value(context, auth.AUTHORIZATION_METADATA_KEY))
        token_hash = token_sha256(token)
        record = await self._workspaces.by_agent_token(token_hash)
        if record is None:
            raise Unauthenticated(
                "the workspace agent token is not valid (the workspace was deleted or the token rotated)",
                reason="AGENT_TOKEN_INVALID",
            )
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT_SECONDS)
        except (StopAsyncIteration, TimeoutError):
            raise InvalidArgument("hello", "the agent must send hello first") from None
        if not first.HasField("hello"):
            raise InvalidArgument("hello", "the agent must send hello first")
        hello = first.hello
        if hello.workspace_id != record.id:
            raise PermissionDenied(
                f"this token belongs to workspace {record.id}, not {hello.workspace_id!r}",
                reason="AGENT_WORKSPACE_MISMATCH",
            )
        _check_hello(hello)
        link = AgentLink(record.id, hello.version, tuple(hello.capabilities), token_hash)
        reader: asyncio.Task[None] | None = None
        try:
            await self._hub.register(link)
            await self._agents.connected(
                record.id,
                link.connection_id,
                self._hub.replica_id,
                self.replica_address,
                hello.version,
                list(hello.capabilities),
            )
            # The token may have been rotated (or the workspace deleted) between the check above and
            # the registration: check again now that rotation would find this link to revoke.
            current = await self._workspaces.by_agent_token(token_hash)
            if current is None or current.id != record.id:
                raise Unauthenticated(
                    "the workspace agent token was replaced while the agent connected",
                    reason="AGENT_TOKEN_INVALID",
                )
            log.info("workspace agent connected", extra={"workspace_id": record.id, "version": hello.version})
            reader = asyncio.create_task(self._read(request_iterator, link))
            interval = duration_pb2.Duration()
            interval.FromMilliseconds(int(self._heartbeat * 1000))
            yield pb.ConnectResponse(
                welcome=pb.AgentWelcome(heartbeat_interval=interval, replica_id=self._hub.replica_id)
            )
            async for message in _drain(link, self._heartbeat):
                yield message
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            self._hub.unregister(link)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._agents.disconnected(record.id, link.connection_id))
            log.info(
                "workspace agent disconnected",
                extra={"workspace_id": record.id, "reason": link.close_reason},
            )

    async def _read(self, requests: AsyncIterator[pb.ConnectRequest], link: AgentLink) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(self._heartbeat * 3):
                        message = await anext(requests)
                except StopAsyncIteration:
                    link.close("the agent closed the connection")
                    return
                except TimeoutError:
                    link.close(f"no heartbeat from the agent for {self._heartbeat * 3:g} s")
                    return
                kind = message.WhichOneof("message")
                if kind == "result":
                    link.deliver(message.result)
                elif kind == "output":
                    link.output(message.output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Whatever broke the reader, the link must not stay open with nobody reading it.
            link.close(f"connection error: {exc}")


async def _drain(link: AgentLink, heartbeat: float) -> AsyncIterator[pb.ConnectResponse]:
    """The link's outbox until it closes, with a heartbeat whenever it is idle for `heartbeat` s."""
    while True:
        try:
            async with asyncio.timeout(heartbeat):
                message = await link.outbox.get()
        except TimeoutError:
            yield pb.ConnectResponse(heartbeat=pb.AgentHeartbeat())
            continue
        if message is None:  # closed
            return
        yield message
        if message.HasField("signal"):
            # Revoked or terminated: the connection ends here, whether the agent obeys or not.
            link.close(f"signalled: {message.signal.reason}")
            return


def _check_hello(hello: pb.AgentHello) -> None:
    if len(hello.version) > MAX_VERSION_LENGTH:
        raise InvalidArgument("hello.version", f"must be at most {MAX_VERSION_LENGTH} characters")
    if len(hello.capabilities) > MAX_CAPABILITIES or any(
        len(c) > MAX_CAPABILITY_LENGTH for c in hello.capabilities
    ):
        raise InvalidArgument(
            "hello.capabilities",
            f"at most {MAX_CAPABILITIES} capabilities of at most {MAX_CAPABILITY_LENGTH} characters",
        )
    if len(hello.running_tool_call_ids) > MAX_RUNNING_IDS:
        raise InvalidArgument("hello.running_tool_call_ids", f"at most {MAX_RUNNING_IDS} ids")


class AgentRelayServicer(pb_grpc.AgentRelayServiceServicer):
    """Runs calls for other toolexec replicas on the agents connected here."""

    def __init__(self, hub: AgentHub, reconnect_grace: float) -> None:
        self._hub = hub
        self._grace = reconnect_grace

    async def RelayToolCall(
        self, request: pb.RelayToolCallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RelayToolCallResponse:
        auth.require_service("toolexec")
        if self._hub.get(request.workspace_id) is None:
            raise FailedPrecondition(
                f"the agent of workspace {request.workspace_id} is not connected to this replica",
                reason="AGENT_NOT_CONNECTED_HERE",
            )
        try:
            result = await self._hub.call(request.workspace_id, request.call, self._grace)
        except AgentUnreachable as exc:
            raise FailedPrecondition(
                str(exc),
                reason="AGENT_LOST_AFTER_SEND" if exc.sent else "AGENT_NOT_CONNECTED_HERE",
            ) from None
        return pb.RelayToolCallResponse(result=result)

    async def RelaySignal(
        self, request: pb.RelaySignalRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RelaySignalResponse:
        auth.require_service("toolexec")
        delivered = self._hub.signal(request.workspace_id, request.signal.kind, request.signal.reason)
        return pb.RelaySignalResponse(delivered=delivered)
