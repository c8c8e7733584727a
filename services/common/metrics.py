"""Prometheus metrics per RPC, health, gauges computed from the database, and the metrics endpoint.

Collectors live in a `CollectorRegistry`; `for_registry(registry)` of each `PerRegistry` class returns the one
set of collectors for that registry, so several servers in one process (tests) share them
instead of failing on duplicate registration. Production uses the default registry.

No ``_created`` series are exported: they double the series of every counter and histogram, and
nothing here alerts on them. docs/operations.md lists every metric.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

import grpc
import grpc.aio
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from services.common.interceptors import ScopeInterceptor

log = logging.getLogger(__name__)

prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# How long database-computed gauges are reused between scrapes, and how long one refresh may take.
STATE_CACHE_SECONDS = 15.0
STATE_QUERY_TIMEOUT_SECONDS = 2.0


class PerRegistry:
    """Collectors registered in one `CollectorRegistry`, created once per registry and class:
    several servers in one process (tests) share them instead of failing on duplicate registration."""

    _instances: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, Any]]
    _instances_lock: ClassVar[threading.Lock]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._instances = weakref.WeakKeyDictionary()
        cls._instances_lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> Self:
        """The collectors of `registry` (default: prometheus_client's global registry), created once."""
        registry = registry or prometheus_client.REGISTRY
        with cls._instances_lock:
            metrics = cls._instances.get(registry)
            if metrics is None:
                metrics = cls(registry)
                cls._instances[registry] = metrics
            return metrics  # type: ignore[no-any-return]


class RpcMetrics(PerRegistry):
    """The per-RPC collectors registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("service", "method")
        super().__init__(registry)
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
        # Labelled by the service's short name: in-process test stacks share one registry.
        self.serving = Gauge(
            "agentplane_health_serving",
            "1 while the server's health says SERVING, 0 while NOT_SERVING (a dependency is down, or "
            "the server is stopping).",
            ("service",),
            registry=registry,
        )
        self.dependency_up = Gauge(
            "agentplane_health_dependency_up",
            "1 while the last health probe of the dependency passed, 0 while it fails.",
            ("service", "dependency"),
            registry=registry,
        )


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


T = TypeVar("T")


class CachedStateCollector(Collector, Generic[T]):
    """Gauges computed by one database query, at most once per `ttl` seconds, only when scraped.

    The metrics endpoint collects in its own thread; the query runs on the service's event loop
    (`attach(loop, load)`) and the scrape waits for it up to `timeout`. A scrape within `ttl` of
    the last refresh reuses its answer, so the query runs at most once per `ttl` however many
    scrapers there are, and never when nobody scrapes. While the query fails, the gauges are
    absent (the database alert says why). Collected on the event loop's own thread (which cannot
    wait for itself), the last answer is used.
    """

    def __init__(
        self,
        render: Callable[[T], Iterable[Metric]],
        *,
        ttl: float = STATE_CACHE_SECONDS,
        timeout: float = STATE_QUERY_TIMEOUT_SECONDS,
    ) -> None:
        self._render = render
        self._ttl = ttl
        self._timeout = timeout
        self._lock = threading.Lock()
        self._source: tuple[asyncio.AbstractEventLoop, Callable[[], Awaitable[T]]] | None = None
        self._value: T | None = None
        self._at = float("-inf")
        self._failing = False

    def attach(self, loop: asyncio.AbstractEventLoop, load: Callable[[], Awaitable[T]]) -> Callable[[], None]:
        """Compute the gauges with `load` on `loop` from now on; returns the function that detaches it."""
        source = (loop, load)
        with self._lock:
            self._source, self._value, self._at = source, None, float("-inf")

        def detach() -> None:
            with self._lock:
                if self._source is source:
                    self._source, self._value = None, None

        return detach

    def describe(self) -> list[Metric]:
        # Registration asks for the names without computing anything.
        return []

    def collect(self) -> Iterator[Metric]:
        value = self._current()
        if value is not None:
            yield from self._render(value)

    def _current(self) -> T | None:
        with self._lock:
            source = self._source
            if source is None:
                return None
            if time.monotonic() - self._at < self._ttl:
                return self._value
            loop, load = source
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop or loop.is_closed():
                return self._value
            future = asyncio.run_coroutine_threadsafe(_call(load), loop)
            try:
                value = future.result(self._timeout)
            except Exception as exc:  # TimeoutError included: a slow database is a failed refresh
                future.cancel()
                if not self._failing:  # once per outage, not at every scrape
                    log.warning("could not compute state metrics: %s", str(exc) or type(exc).__name__)
                self._failing = True
                self._value, self._at = None, time.monotonic()
                return None
            self._failing = False
            self._value, self._at = value, time.monotonic()
            return value


async def _call(load: Callable[[], Awaitable[T]]) -> T:
    return await load()
