"""The server side of tracing: a span per RPC, the child of the caller's span.

Apart from `tracing` so that the workspace agent, which imports `tracing`, loads nothing of the
server kit. `server.default_interceptors` adds it only while tracing is on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common import tracing
from services.common.interceptors import ScopeInterceptor
from services.common.metrics import split_method

# RPCs without a span: probes, and the agents' hours-long Connect streams (each tool call sent
# over one has its own span in toolexec instead).
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/agentplane.toolexec.v1.WorkspaceAgentService/")
# Server span status per the semantic conventions: only these codes are the server's failure.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TracingInterceptor(ScopeInterceptor):
    """A server span per RPC, the child of the caller's span when the metadata carries one.

    In the chain right after metrics, so the request context, error and auth interceptors (and
    their log lines) run inside the span.
    """

    @asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        tracer = tracing.tracer()
        if tracer is None or method.startswith(UNTRACED_PREFIXES):
            yield
            return
        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if k in tracing.TRACE_KEYS}
        service, name = split_method(method)
        with tracer.start_as_current_span(
            method.lstrip("/"),
            context=tracing.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as server_span:
            code: Any = grpc.StatusCode.OK
            try:
                yield
                code = context.code() or grpc.StatusCode.OK
            except BaseException as exc:
                code = context.code() or _code_of(exc)
                if not isinstance(exc, grpc.aio.AbortError):
                    server_span.record_exception(exc)
                raise
            finally:
                _set_status(server_span, code)


def _code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _set_status(server_span: Any, code: Any) -> None:
    status = code if isinstance(code, grpc.StatusCode) else _status_of(code)
    if status is None:
        return
    server_span.set_attribute("rpc.grpc.status_code", status.value[0])
    if status in SERVER_ERROR_CODES:
        server_span.set_status(Status(StatusCode.ERROR, status.name))


def _status_of(code: Any) -> grpc.StatusCode | None:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c
    return None
