"""Prometheus metrics per RPC, and the metrics HTTP endpoint.

Collectors live in a `CollectorRegistry`; `RpcMetrics.for_registry(registry)` returns the one
set of collectors for that registry, so several servers in one process (tests) share them
instead of failing on duplicate registration. Production uses the default registry.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.interceptors import ScopeInterceptor

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RpcMetrics:
    """The per-RPC collectors registered in one registry."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, RpcMetrics] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("service", "method")
        self.registry = registry
        self.requests = Counter(
            "agentplane_rpc_requests",
            "RPCs handled, by final status code.",
            (*labels, "code"),
            registry=registry,
        )
        self.latency = Histogram(
            "agentplane_rpc_latency_seconds",
            "Time from the start of an RPC to its end (the last message of a stream).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "agentplane_rpc_in_flight", "RPCs being handled now.", labels, registry=registry
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> RpcMetrics:
        """The collectors of `registry` (default: prometheus_client's global registry), created once."""
        registry = registry or prometheus_client.REGISTRY
        with cls._lock:
            metrics = cls._by_registry.get(registry)
            if metrics is None:
                metrics = cls(registry)
                cls._by_registry[registry] = metrics
            return metrics


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    _, _, rest = method.partition("/")
    service, _, name = rest.partition("/")
    return service or "unknown", name or method


class MetricsInterceptor(ScopeInterceptor):
    """Counts RPCs by final code, observes latency, and tracks in-flight calls."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    @asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        service, name = split_method(method)
        m = self._metrics
        in_flight = m.in_flight.labels(service, name)
        in_flight.inc()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            in_flight.dec()
            m.latency.labels(service, name).observe(time.perf_counter() - start)
            m.requests.labels(service, name, _code_name(code)).inc()


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    import asyncio

    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    return str(code)


@dataclass
class MetricsServer:
    """A running metrics HTTP endpoint (`/metrics`)."""

    port: int
    _server: Any
    _thread: threading.Thread

    def stop(self) -> None:
        """Shut the endpoint down."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    port: int, host: str = "0.0.0.0", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve `registry` over HTTP on `host:port` (0 = ephemeral); returns the bound port."""
    server, thread = prometheus_client.start_http_server(
        port, addr=host, registry=registry or prometheus_client.REGISTRY
    )
    return MetricsServer(port=int(server.server_port), _server=server, _thread=thread)
