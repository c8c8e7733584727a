"""The agent's one connection: dial toolexec, say hello, serve calls, reconnect with jittered backoff.

The agent never listens. Messages to toolexec go through one writer task (a grpc stream takes
one write at a time); each call runs in its own task, so a long `execute` never blocks a read.
A call still running when the connection drops keeps running; toolexec re-sends it after the
reconnect and gets its result (or waits for it) from `AgentCalls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
from agentplane.toolexec.v1 import workspace_agent_service_pb2 as pb
from agentplane.toolexec.v1 import workspace_agent_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2

from services.agent.calls import AgentCalls, CallAnswer
from services.agent.tools.base import ToolError
from services.common import tracing

log = logging.getLogger(__name__)

VERSION = "0.1.0"
CAPABILITIES = (
    "read_file",
    "write_file",
    "edit_files",
    "execute",
    "process_output",
    "process_list",
    "process_signal",
    "execute_output_stream",
)
INITIAL_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 5.0
DEFAULT_HEARTBEAT_SECONDS = 10.0
MISSED_HEARTBEATS = 3
# Exit codes: the token was refused or revoked, the workspace was deleted.
EXIT_UNAUTHENTICATED = 3
EXIT_TERMINATED = 0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnects are ours (with jitter); grpc's own backoff would add seconds after a restart.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class AgentExit(Exception):
    """The agent must stop (with `code`): the token is invalid or the workspace was deleted."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@dataclass
class AgentOptions:
    """What the agent needs to dial out."""

    url: str
    token: str
    workspace_id: str
    on_terminate: Callable[[], None] = field(default=lambda: None)
    credentials: grpc.ChannelCredentials | None = None


class Backoff:
    """Exponential backoff with full jitter: the n-th delay is uniform in [0, min(cap, initial * 2^n)]."""

    def __init__(self, initial: float, cap: float) -> None:
        self._initial = initial
        self._cap = cap
        self._attempt = 0

    def next(self) -> float:
        """The next delay."""
        ceiling = min(self._cap, self._initial * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start over after a success."""
        self._attempt = 0


TLS_SCHEMES = ("https://", "grpcs://")


def uses_tls(url: str) -> bool:
    """True for https:// and grpcs:// URLs (the agent then dials with TLS)."""
    return url.startswith(TLS_SCHEMES)


def _target(url: str) -> str:
    # grpc takes host:port and unix:/path; accept the http(s):// and grpc(s):// forms people paste too.
    for prefix in ("grpc://", "http://", *TLS_SCHEMES):
        if url.startswith(prefix):
            return url[len(prefix) :].rstrip("/")
    return url


def is_local_target(url: str) -> bool:
    """True for a Unix socket or a loopback address (plaintext is fine there)."""
    target = _target(url)
    if target.startswith("unix:"):
        return True
    host = target.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


class AgentConnection:
    """Serves `calls` over connections to toolexec until told to stop."""

    def __init__(self, options: AgentOptions, calls: AgentCalls) -> None:
        self._options = options
        self._calls = calls
        self.connected = asyncio.Event()
        self.connections = 0

    async def run_forever(self) -> int:
        """Dial, serve, redial; returns the exit code when the agent must stop."""
        backoff = Backoff(INITIAL_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS)
        while True:
            try:
                await self._serve_once(backoff)
            except AgentExit as exc:
                log.warning("workspace agent stopping: %s", exc)
                return exc.code
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("toolexec refused the agent token: %s", exc.details())
                    return EXIT_UNAUTHENTICATED
                log.info("connection to toolexec lost: %s %s", exc.code().name, exc.details())
            except (TimeoutError, OSError, ConnectionError) as exc:
                log.info("connection to toolexec lost: %s", exc)
            self.connected.clear()
            await asyncio.sleep(backoff.next())

    async def _serve_once(self, backoff: Backoff) -> None:
        target = _target(self._options.url)
        if self._options.credentials is not None:
            channel = grpc.aio.secure_channel(target, self._options.credentials, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        async with channel:
            stub = pb_grpc.WorkspaceAgentServiceStub(channel)
            call = stub.Connect(metadata=(("authorization", f"Bearer {self._options.token}"),))
            outbox: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
            await call.write(
                pb.ConnectRequest(
                    hello=pb.AgentHello(
                        workspace_id=self._options.workspace_id,
                        version=VERSION,
                        capabilities=CAPABILITIES,
                        running_tool_call_ids=self._calls.running_ids(),
                    )
                )
            )
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("welcome"):
                raise ConnectionError("toolexec closed the connection before welcoming the agent")
            interval = (
                first.welcome.heartbeat_interval.ToTimedelta().total_seconds() or DEFAULT_HEARTBEAT_SECONDS
            )
            backoff.reset()
            self.connections += 1
            self.connected.set()
            log.info("connected to toolexec", extra={"replica_id": first.welcome.replica_id})
            tasks: set[asyncio.Task[None]] = set()
            writer = asyncio.create_task(self._write_loop(call, outbox, interval))
            try:
                await self._read_loop(call, outbox, interval, tasks)
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await writer
                call.cancel()

    async def _write_loop(
        self,
        call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse],
        outbox: asyncio.Queue[pb.ConnectRequest],
        interval: float,
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(interval):
                    message = await outbox.get()
            except TimeoutError:
                message = pb.ConnectRequest(heartbeat=pb.AgentHeartbeat())
            await call.write(message)

    async def _read_loop(
        self,
        call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse],
        outbox: asyncio.Queue[pb.ConnectRequest],
        interval: float,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(interval * MISSED_HEARTBEATS):
                    message = await call.read()
            except TimeoutError:
                raise ConnectionError(
                    f"no word from toolexec for {interval * MISSED_HEARTBEATS:g} s"
                ) from None
            if message is grpc.aio.EOF:
                raise ConnectionError("toolexec closed the connection")
            kind = message.WhichOneof("message")
            if kind == "call":
                task = asyncio.create_task(self._serve_call(message.call, outbox))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind == "signal":
                self._on_signal(message.signal)
            # heartbeat: nothing to do (reading it reset the timer); cancel: the run goes on, its
            # result is recorded and toolexec asks again if it still wants it.

    async def _serve_call(self, message: pb.AgentToolCall, outbox: asyncio.Queue[pb.ConnectRequest]) -> None:
        timeout = message.timeout.ToTimedelta().total_seconds() if message.HasField("timeout") else None

        def on_output(text: str) -> None:
            outbox.put_nowait(
                pb.ConnectRequest(output=pb.AgentToolOutput(tool_call_id=message.tool_call_id, text=text))
            )

        try:
            # A span only where this agent's environment names a collector (tracing.configure).
            with tracing.remote_span(
                f"agent {message.name}",
                message.trace_context,
                attributes={"agentplane.tool": message.name, "agentplane.tool_call_id": message.tool_call_id},
            ):
                answer = await self._calls.call(
                    message.tool_call_id,
                    message.name,
                    message.arguments_json,
                    message.arguments_sha256,
                    timeout,
                    on_output,
                )
        except Exception:
            # Never leave toolexec waiting: a bug here is still an answer (and says the call may have run).
            log.exception("serving call %s failed", message.tool_call_id)
            answer = CallAnswer(
                ToolError(
                    f"the workspace agent failed while handling this {message.name} call; it may have run. "
                    "Check the workspace before repeating it.",
                    code="agent_error",
                ).to_result(),
                False,
                0.0,
            )
        duration = duration_pb2.Duration()
        duration.FromNanoseconds(int(answer.duration_seconds * 1e9))
        outbox.put_nowait(
            pb.ConnectRequest(
                result=pb.AgentToolResult(
                    tool_call_id=message.tool_call_id,
                    content=answer.result.content,
                    structured_json=json.dumps(answer.result.structured, separators=(",", ":")),
                    is_error=answer.result.is_error,
                    replayed=answer.replayed,
                    duration=duration,
                )
            )
        )

    def _on_signal(self, signal: pb.AgentSignal) -> None:
        if signal.kind == pb.AGENT_SIGNAL_KIND_TERMINATE_WORKSPACE:
            self._options.on_terminate()
            raise AgentExit(EXIT_TERMINATED, f"the workspace was deleted ({signal.reason})")
        if signal.kind == pb.AGENT_SIGNAL_KIND_TOKEN_REVOKED:
            raise AgentExit(EXIT_UNAUTHENTICATED, f"the agent token was replaced ({signal.reason})")
