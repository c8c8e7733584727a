"""Client side of the kit: channels with retries, and metadata on every outgoing call.

`create_channel` returns a grpc.aio channel whose interceptor adds, to every call:
``authorization: Bearer <token>`` (from a fixed token or a provider called per call),
``x-agentplane-on-behalf-of`` (from `auth.outgoing_on_behalf_of()`: an explicit
`auth.acting_for(user)` block, else the effective user of the RPC being served),
``x-request-id`` (the current request id, so one id follows a request across services), and,
while tracing is on, ``traceparent`` (the current span, so the callee's span joins its trace).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import auth, logs, tls, tracing
from services.common.server import MAX_MESSAGE_BYTES

TokenProvider = Callable[[], str]

# What the channel retries on a method that is safe to repeat: UNAVAILABLE only, which from our
# servers means the call never reached a handler (a handler's own UNAVAILABLE carries retry
# pushback -1, see `rpc_errors.to_status`, so it is never repeated).
DEFAULT_RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

# The methods the channel retries: reads, resumable streams, writes made idempotent by a request
# id (a repeat with the same request_id returns the first result; callers that leave it empty give
# that safety up) or by a tool call id (toolexec's ledger and the agent answer a repeated id without
# running it twice), and deletes (deleting what is gone succeeds, so a repeat of one that worked
# answers as the first did). gRPC never retries a call once response headers arrived, so a stream
# that delivered anything is never repeated.
RETRIED_METHODS: dict[str, tuple[str, ...]] = {
    "agentplane.chat.v1.ChatService": (
        "GetChat",
        "ListChats",
        "ListMessages",
        "ListQueuedMessages",
        "StreamChat",  # resumes from after_seq
        "WatchChats",  # resumes from its cursor
        "GetUsage",
        "CreateChat",  # request_id
        "SendMessage",  # request_id
        "ForkChat",  # request_id
        "EditMessage",  # request_id
        "CompactChat",  # request_id
        "DeleteChat",  # idempotent
        "DeleteQueuedMessage",  # idempotent
    ),
    "agentplane.config.v1.ConfigService": (
        "GetProvider",
        "ListProviders",
        "GetProviderCredentials",
        "GetModelConfig",
        "ListModelConfigs",
        "ResolveModel",
        "GetWorkspaceTemplate",
        "ListWorkspaceTemplates",
        "GetSystemPrompt",
        "GetUserPrompt",
        "CreateProvider",  # request_id
        "CreateModelConfig",  # request_id
        "CreateWorkspaceTemplate",  # request_id
        "DeleteProvider",  # idempotent (with an etag too: a provider that is gone is no mismatch)
        "DeleteModelConfig",  # idempotent
        "DeleteWorkspaceTemplate",  # idempotent
    ),
    "agentplane.config.v1.TokenService": (
        "ListRevokedTokens",
        "RevokeToken",  # a repeat returns the first revocation
    ),
    "agentplane.inference.v1.InferenceService": ("ListProviderModels",),
    "agentplane.toolexec.v1.ToolExecService": (
        "GetWorkspace",
        "ListWorkspaces",
        "ListTools",
        "CreateWorkspace",  # request_id
        "CallTool",  # tool_call_id
        "DeleteWorkspace",  # idempotent
    ),
    "grpc.health.v1.Health": ("Check", "List", "Watch"),
}

# Every other method of our services, never repeated by the channel (a test checks each method is
# in exactly one of the two tables, so a new RPC needs a decision):
NOT_RETRIED_METHODS: dict[str, tuple[str, ...]] = {
    # Updates and state changes: a repeat after an outcome-unknown failure may act on a state
    # someone else changed meanwhile (InterruptChat could stop the next turn; an update with an
    # etag would fail against the version its own first attempt made). The caller reads and decides.
    "agentplane.chat.v1.ChatService": (
        "UpdateChat",
        "PromoteQueuedMessage",
        "InterruptChat",
    ),
    "agentplane.config.v1.ConfigService": (
        "UpdateProvider",
        "RotateEncryptionKey",
        "UpdateModelConfig",
        "SetDefaultModelConfig",
        "UpdateWorkspaceTemplate",
        "UpdateSystemPrompt",
        "UpdateUserPrompt",
    ),
    # Generate: a provider call costs money and may already have been made, and inference retries
    # providers itself (telling the caller with RetryNotices); one layer of retries, not two.
    "agentplane.inference.v1.InferenceService": ("Generate",),
    "agentplane.toolexec.v1.ToolExecService": ("RotateWorkspaceAgentToken",),
    # The agent's stream reconnects with its own backoff; the relay's caller (toolexec's router)
    # decides from the answer whether the call may have reached the agent.
    "agentplane.toolexec.v1.WorkspaceAgentService": ("Connect",),
    "agentplane.toolexec.v1.AgentRelayService": ("RelayToolCall", "RelaySignal"),
}

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
]


def service_config(retry_policy: dict[str, Any] | None = None) -> str:
    """The channel's service config JSON: `retry_policy` (default `DEFAULT_RETRY_POLICY`) on the
    methods of `RETRIED_METHODS`; every other method is not retried."""
    names = [
        {"service": service, "method": name}
        for service, methods in RETRIED_METHODS.items()
        for name in methods
    ]
    return json.dumps(
        {
            "methodConfig": [
                {"name": names, "retryPolicy": retry_policy or DEFAULT_RETRY_POLICY, "waitForReady": False}
            ]
        }
    )


def outgoing_metadata(token: str | None) -> list[tuple[str, str]]:
    """The metadata the client interceptor adds for the current context."""
    md: list[tuple[str, str]] = []
    if token:
        md.append((auth.AUTHORIZATION_METADATA_KEY, f"Bearer {token}"))
    user = auth.outgoing_on_behalf_of()
    if user and token:
        md.append((auth.ON_BEHALF_OF_METADATA_KEY, user))
    request_id = logs.current_request_id()
    if request_id:
        md.append((logs.REQUEST_ID_METADATA_KEY, request_id))
    if tracing.enabled():
        md += tracing.outgoing_metadata()
    return md


class _AddMetadata:
    """Adds auth, on-behalf-of and request-id metadata; explicit per-call metadata wins."""

    def __init__(self, token_provider: TokenProvider | None) -> None:
        self._token_provider = token_provider

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        existing = list(details.metadata or ())
        present = {k for k, _ in existing}
        token = self._token_provider() if self._token_provider else None
        added = [(k, v) for k, v in outgoing_metadata(token) if k not in present]
        if not added:
            return details
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=grpc.aio.Metadata(*existing, *added),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


# grpc.aio files each interceptor under one call kind only, so there is one class per kind.
class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await continuation(self._details(client_call_details), requests)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, requests: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), requests)


def metadata_interceptors(token_provider: TokenProvider | None) -> list[grpc.aio.ClientInterceptor]:
    """The client interceptors (one per call kind) that add auth, on-behalf-of and request id."""
    return [cls(token_provider) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def create_channel(
    address: str,
    *,
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    retry_policy: dict[str, Any] | None = None,
    retries: bool = True,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    tls_settings: tls.TLSSettings | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` that authenticates every call.

    TLS (server verified with the CA file, client certificate presented for mutual TLS, files
    reloaded when they change) or plaintext as `tls_settings` (default `tls.current()`) say.

    Give either a fixed `token` or a `token_provider` (called once per call, so it can
    refresh, e.g. `auth.ServiceTokenProvider`). Retries of UNAVAILABLE are declared in the
    service config for the methods safe to repeat (`RETRIED_METHODS`; `retries=False` turns
    them off); messages up to 16 MiB are allowed.
    """
    if token is not None and token_provider is not None:
        raise ValueError("give token or token_provider, not both")
    provider = token_provider or ((lambda: token) if token is not None else None)  # type: ignore[return-value]
    base = [o for o in CHANNEL_OPTIONS if retries or o[0] != "grpc.enable_retries"]
    if retries:
        base.append(("grpc.service_config", service_config(retry_policy)))
    else:
        base.append(("grpc.enable_retries", 0))
    return (tls_settings or tls.current()).dial(
        address,
        options=[*base, *options],
        interceptors=[*metadata_interceptors(provider), *interceptors],
    )


async def wait_for_health(
    address: str, *, within: float = 60.0, alive: Callable[[], bool] | None = None
) -> None:
    """Wait until the server at `address` reports SERVING on the standard health service.

    Raises TimeoutError after `within` seconds, or RuntimeError as soon as `alive()` (for
    example "the child process still runs") turns false.
    """
    deadline = time.monotonic() + within
    async with tls.current().dial(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if alive is not None and not alive():
                raise RuntimeError(f"the server for {address} exited before it became healthy")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} was not healthy after {within:.0f}s")
            await asyncio.sleep(0.05)
