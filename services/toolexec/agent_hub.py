"""The workspace agents connected to this toolexec replica, and calls sent over their connections.

An `AgentLink` is one agent connection: an outbox the Connect stream drains, and the calls
waiting for their results. A call whose link closes before the result arrives is re-sent on
the agent's next connection (the agent answers a re-sent id from its record or waits for the
run in progress, so nothing runs twice); if no connection comes back in time the call fails
with `AgentUnreachable`, saying whether it may have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from agentplane.toolexec.v1 import workspace_agent_service_pb2 as pb

log = logging.getLogger(__name__)


class AgentUnreachable(Exception):
    """No connection to the workspace's agent; `sent` says whether the call may have reached it."""

    def __init__(self, workspace_id: str, sent: bool) -> None:
        super().__init__(f"the agent of workspace {workspace_id} is not connected")
        self.workspace_id = workspace_id
        self.sent = sent


class LinkClosed(Exception):
    """The connection a call was sent over ended before its result came back."""


class AgentTimedOut(Exception):
    """The agent took longer than the call may take (it is alive, but no result came back)."""


class AgentLink:
    """One live agent connection on this replica."""

    def __init__(
        self,
        workspace_id: str,
        version: str = "",
        capabilities: tuple[str, ...] = (),
        token_sha256: str = "",
    ) -> None:
        self.workspace_id = workspace_id
        self.token_sha256 = token_sha256
        self.connection_id = uuid.uuid4().hex
        self.version = version
        self.capabilities = capabilities
        # None, once, after close(): the Connect stream stops draining.
        self.outbox: asyncio.Queue[pb.ConnectResponse | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_reason = ""
        # Told to terminate or that its token was revoked: it gets no new calls, and its stream
        # ends once the signal is out, whether or not the agent obeys.
        self.ending = False
        self._pending: dict[str, list[asyncio.Future[pb.AgentToolResult]]] = {}
        self._output: dict[str, Callable[[str], None]] = {}

    def send_call(
        self, call: pb.AgentToolCall, on_output: Callable[[str], None] | None = None
    ) -> asyncio.Future[pb.AgentToolResult]:
        """Send `call`; the future resolves with the agent's result (LinkClosed if the link ends first)."""
        future: asyncio.Future[pb.AgentToolResult] = asyncio.get_running_loop().create_future()
        if self.closed.is_set():
            future.set_exception(LinkClosed(self.close_reason))
            return future
        self._pending.setdefault(call.tool_call_id, []).append(future)
        if on_output is not None:
            self._output[call.tool_call_id] = on_output
        self.outbox.put_nowait(pb.ConnectResponse(call=call))
        return future

    def send_signal(self, kind: pb.AgentSignalKind.ValueType, reason: str) -> None:
        """Send a signal to the agent; the connection ends right after it."""
        self.ending = True
        self.outbox.put_nowait(pb.ConnectResponse(signal=pb.AgentSignal(kind=kind, reason=reason)))

    def deliver(self, result: pb.AgentToolResult) -> None:
        """A result arrived from the agent."""
        self._output.pop(result.tool_call_id, None)
        for future in self._pending.pop(result.tool_call_id, []):
            if not future.done():
                future.set_result(result)

    def output(self, chunk: pb.AgentToolOutput) -> None:
        """Output of a running call arrived."""
        listener = self._output.get(chunk.tool_call_id)
        if listener is not None:
            listener(chunk.text)

    def forget(self, tool_call_id: str, future: asyncio.Future[pb.AgentToolResult]) -> None:
        """A caller stopped waiting."""
        waiting = self._pending.get(tool_call_id)
        if waiting and future in waiting:
            waiting.remove(future)
            if not waiting:
                self._pending.pop(tool_call_id, None)
                self._output.pop(tool_call_id, None)
                self.outbox.put_nowait(pb.ConnectResponse(cancel=pb.AgentCancel(tool_call_id=tool_call_id)))

    def close(self, reason: str) -> None:
        """End the connection (the Connect stream returns); waiting calls move to the next link."""
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
            self.outbox.put_nowait(None)
            pending, self._pending = self._pending, {}
            self._output.clear()
            for futures in pending.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(LinkClosed(reason))


class AgentHub:
    """Agent links of this replica, by workspace."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self._links: dict[str, AgentLink] = {}
        self._arrived = asyncio.Condition()

    def get(self, workspace_id: str) -> AgentLink | None:
        """The workspace's live link here, or None."""
        link = self._links.get(workspace_id)
        if link is None or link.closed.is_set() or link.ending:
            return None
        return link

    def links(self) -> list[AgentLink]:
        """Every live link."""
        return [link for link in self._links.values() if not link.closed.is_set() and not link.ending]

    async def register(self, link: AgentLink) -> None:
        """A new connection of a workspace's agent; an older one of the same workspace is closed."""
        old = self._links.get(link.workspace_id)
        if old is not None and old is not link:
            old.close("replaced by a newer connection of the same agent")
        self._links[link.workspace_id] = link
        async with self._arrived:
            self._arrived.notify_all()

    def unregister(self, link: AgentLink) -> None:
        """The connection ended."""
        link.close(link.close_reason or "connection ended")
        if self._links.get(link.workspace_id) is link:
            del self._links[link.workspace_id]

    async def wait_for_link(self, workspace_id: str, wait_seconds: float) -> AgentLink | None:
        """The workspace's link, waiting up to `wait_seconds` for one to connect here."""
        link = self.get(workspace_id)
        if link is not None or wait_seconds <= 0:
            return link
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                async with self._arrived:
                    await self._arrived.wait_for(lambda: self.get(workspace_id) is not None)
        return self.get(workspace_id)

    async def call(
        self,
        workspace_id: str,
        call: pb.AgentToolCall,
        reconnect_grace: float,
        on_output: Callable[[str], None] | None = None,
        deadline_seconds: float | None = None,
    ) -> pb.AgentToolResult:
        """Run `call` on the workspace's agent connected here, re-sending it over reconnects.

        Raises AgentTimedOut after `deadline_seconds` without a result (the call may have run).
        """
        if deadline_seconds is None:
            return await self._call(workspace_id, call, reconnect_grace, on_output)
        try:
            async with asyncio.timeout(deadline_seconds):
                return await self._call(workspace_id, call, reconnect_grace, on_output)
        except TimeoutError:
            raise AgentTimedOut(
                f"no result from the agent of {workspace_id} in {deadline_seconds:g} s"
            ) from None

    async def _call(
        self,
        workspace_id: str,
        call: pb.AgentToolCall,
        reconnect_grace: float,
        on_output: Callable[[str], None] | None,
    ) -> pb.AgentToolResult:
        sent = False
        while True:
            link = await self.wait_for_link(workspace_id, reconnect_grace if sent else 0)
            if link is None:
                raise AgentUnreachable(workspace_id, sent)
            future = link.send_call(call, on_output)
            sent = True
            try:
                return await future
            except LinkClosed:
                pass
            except asyncio.CancelledError:
                link.forget(call.tool_call_id, future)
                raise
            log.info(
                "agent connection lost during a call; waiting for it to reconnect",
                extra={"workspace_id": workspace_id, "tool_call_id": call.tool_call_id},
            )

    def signal(self, workspace_id: str, kind: pb.AgentSignalKind.ValueType, reason: str) -> bool:
        """Signal the workspace's agent if it is connected here."""
        link = self._links.get(workspace_id)
        if link is None or link.closed.is_set():
            return False
        link.send_signal(kind, reason)
        return True
