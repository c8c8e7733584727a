"""OpenTelemetry tracing: off unless an OTLP endpoint is configured, and then one trace per turn.

`configure(service)` turns tracing on when the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and neither ``OTEL_SDK_DISABLED=true`` nor
``OTEL_TRACES_EXPORTER=none``): spans go in batches to that collector over OTLP/gRPC; the
exporter reads the other standard variables itself (``OTEL_EXPORTER_OTLP_INSECURE``, headers,
certificate, ``OTEL_RESOURCE_ATTRIBUTES``...). Off, `span()` is a shared null context manager
and no interceptor, metadata or SDK is involved: the only cost is one `None` check.

Context crosses processes as W3C Trace Context (``traceparent``): in gRPC metadata (the client
kit adds it, `tracing_interceptor.TracingInterceptor` reads it) and, to the workspace agent, in
the ``AgentToolCall.trace_context`` field of the agent protocol.

The workspace agent imports this module too: it imports nothing but the standard library and
`logs` until tracing is turned on (an idle agent stays small, and never loads ssl).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from services.common import logs

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACER_NAME = "agentplane"
# The metadata (and trace_context) keys of W3C Trace Context.
TRACE_KEYS = ("traceparent", "tracestate")
# Span kinds (OpenTelemetry's SpanKind, named without importing it while tracing is off).
INTERNAL, SERVER, CLIENT = "internal", "server", "client"

_NULL: AbstractContextManager[Any] = contextlib.nullcontext()
# While tracing is on: the tracer, its provider, the W3C propagator, the span kinds and the
# current-span getter. `_tracer is None` means off.
_tracer: Any = None
_provider: TracerProvider | None = None
_propagator: Any = None
_kinds: dict[str, Any] = {}
_current_span: Callable[[], Any] | None = None

Attributes = Mapping[str, str | int | float | bool]


def enabled() -> bool:
    """Whether spans are being recorded."""
    return _tracer is not None


def endpoint_from(env: Mapping[str, str]) -> str | None:
    """The OTLP endpoint the standard variables name, or None when tracing is to stay off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def configure(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on for this process when the environment names an OTLP endpoint; True if on.

    Spans carry the resource ``service.name=agentplane-<service>`` (``OTEL_SERVICE_NAME`` wins).
    """
    environ = os.environ if env is None else env
    if endpoint_from(environ) is None:
        return False
    # The SDK and exporter load only here: a process with tracing off never imports them.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = environ.get("OTEL_SERVICE_NAME") or f"agentplane-{service}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    # The exporter reads the endpoint (and TLS, headers, timeout) from the same variables.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    install(provider)
    return True


def install(provider: TracerProvider | None) -> None:
    """Record spans with `provider` (tests pass one with an in-memory exporter); None: off.

    Tracing must be on before servers are built: their interceptor chain is fixed at creation.
    """
    global _tracer, _provider, _propagator, _kinds, _current_span
    if provider is None:
        _tracer = _provider = _propagator = _current_span = None
        logs.set_trace_ids_source(None)
        return
    from opentelemetry.trace import SpanKind, get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _kinds = {INTERNAL: SpanKind.INTERNAL, SERVER: SpanKind.SERVER, CLIENT: SpanKind.CLIENT}
    _propagator = TraceContextTextMapPropagator()
    _current_span = get_current_span
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME)
    logs.set_trace_ids_source(current_ids)


def tracer() -> Any:
    """The OpenTelemetry tracer while tracing is on, else None."""
    return _tracer


def shutdown() -> None:
    """Flush the spans still batched and stop exporting (process exit)."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


def flush(timeout_seconds: float = 10.0) -> bool:
    """Export the spans batched so far now; False if that did not finish in time. It blocks:
    async code calls it from a thread."""
    provider = _provider
    return provider.force_flush(int(timeout_seconds * 1000)) if provider is not None else True


def span(
    name: str, *, kind: str = INTERNAL, attributes: Attributes | None = None
) -> AbstractContextManager[Any]:
    """A span around a block, current inside it (the null context when tracing is off).

    An exception leaving the block is recorded on the span and sets its status to error.
    """
    t = _tracer
    if t is None:
        return _NULL
    return t.start_as_current_span(name, kind=_kinds[kind], attributes=attributes)  # type: ignore[no-any-return]


def remote_span(
    name: str, carrier: Mapping[str, str], *, kind: str = SERVER, attributes: Attributes | None = None
) -> AbstractContextManager[Any]:
    """Like `span`, as the child of the remote span that `carrier` (W3C Trace Context) names."""
    t = _tracer
    if t is None:
        return _NULL
    return t.start_as_current_span(  # type: ignore[no-any-return]
        name, context=extract(carrier), kind=_kinds[kind], attributes=attributes
    )


def start_span(name: str, *, kind: str = CLIENT, attributes: Attributes | None = None) -> Any:
    """A span that is not made current, for code that cannot hold a `with` block open (an async
    generator that yields inside it); the caller ends it. None when tracing is off."""
    t = _tracer
    if t is None:
        return None
    return t.start_span(name, kind=_kinds[kind], attributes=attributes)


def extract(carrier: Mapping[str, str]) -> Any:
    """The remote parent context `carrier` names (None: no parent, or tracing is off)."""
    if _propagator is None or not carrier:
        return None
    return _propagator.extract(carrier)


def inject(carrier: MutableMapping[str, str]) -> None:
    """Add the current span's W3C Trace Context to `carrier` (nothing when off or outside a span)."""
    if _propagator is not None:
        _propagator.inject(carrier)


def outgoing_metadata() -> list[tuple[str, str]]:
    """The trace context of the current span as gRPC metadata (empty when off)."""
    if _propagator is None:
        return []
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return list(carrier.items())


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, or None (for log lines)."""
    getter = _current_span
    if getter is None:
        return None
    ctx = getter().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


@contextlib.contextmanager
def installed(provider: TracerProvider | None) -> Iterator[None]:
    """Tracing with `provider` inside the block, the previous state after it (tests)."""
    previous = _provider
    install(provider)
    try:
        yield
    finally:
        install(previous)
