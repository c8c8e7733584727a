"""Gauges that cost little: the database-computed ones run their query only when scraped, at
most once per cache period however many scrapes come, never block the event loop's own thread,
and vanish (instead of lying) while the query fails or hangs. Health gauges follow the probes.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from services.common.metrics import CachedStateCollector, RpcMetrics, start_metrics_server
from services.common.server import ServerHandle, create_server
from tests.common.test_health_probes import Dependency
from tests.common.testsvc import SERVICE, TestServicer
from tests.helpers import make_test_settings, wait_until


def _render(value: int) -> Iterable[Metric]:
    yield GaugeMetricFamily("agentplane_test_state", "A state gauge.", value=value)


class Source:
    """A state query: counts its runs; answers, fails or hangs as the test says."""

    def __init__(self) -> None:
        self.runs = 0
        self.value = 7
        self.mode = "answer"

    async def load(self) -> int:
        self.runs += 1
        if self.mode == "fail":
            raise ConnectionError("the database is down")
        if self.mode == "hang":
            await asyncio.Event().wait()
        return self.value


async def _scrape(port: int) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    # From a thread, as Prometheus scrapes: the query runs on this event loop meanwhile.
    return await asyncio.to_thread(fetch)


def _sample(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith("agentplane_test_state ")]
    return lines[0].split()[1] if lines else None


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def test_the_query_runs_on_scrape_once_per_period(registry: CollectorRegistry) -> None:
    source = Source()
    collector: CachedStateCollector[int] = CachedStateCollector(_render, ttl=3600)
    registry.register(collector)  # registering computes nothing
    detach = collector.attach(asyncio.get_running_loop(), source.load)
    server = start_metrics_server(0, "127.0.0.1", registry)
    try:
        assert source.runs == 0, "nothing runs until someone scrapes"
        assert _sample(await _scrape(server.port)) == "7.0"
        source.value = 8
        for _ in range(3):
            assert _sample(await _scrape(server.port)) == "7.0", "within the period the answer is reused"
        assert source.runs == 1
        # Collected on the event loop's own thread (which must not wait for itself): the last answer.
        assert _sample(generate_latest(registry).decode()) == "7.0"
        assert source.runs == 1
        detach()
        assert _sample(await _scrape(server.port)) is None
    finally:
        server.stop()


async def test_every_scrape_queries_without_a_cache(registry: CollectorRegistry) -> None:
    source = Source()
    collector: CachedStateCollector[int] = CachedStateCollector(_render, ttl=0)
    registry.register(collector)
    collector.attach(asyncio.get_running_loop(), source.load)
    server = start_metrics_server(0, "127.0.0.1", registry)
    try:
        assert _sample(await _scrape(server.port)) == "7.0"
        source.value = 9
        assert _sample(await _scrape(server.port)) == "9.0"
        assert source.runs == 2
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["fail", "hang"])
async def test_a_failing_or_hung_query_leaves_the_gauges_out(registry: CollectorRegistry, mode: str) -> None:
    source = Source()
    source.mode = mode
    collector: CachedStateCollector[int] = CachedStateCollector(_render, ttl=3600, timeout=0.2)
    registry.register(collector)
    collector.attach(asyncio.get_running_loop(), source.load)
    server = start_metrics_server(0, "127.0.0.1", registry)
    try:
        text = await _scrape(server.port)
        assert _sample(text) is None
        # The rest of the endpoint still answers, and the failure is remembered for the period:
        # a database that is down is not asked again at every scrape.
        assert await _scrape(server.port) == text
        assert source.runs == 1
    finally:
        server.stop()


@pytest.fixture
async def handle(registry: CollectorRegistry) -> AsyncIterator[ServerHandle]:
    built = create_server(
        make_test_settings(),
        "chat",
        TestServicer().register,
        [SERVICE],
        metrics=RpcMetrics.for_registry(registry),
    )
    built.health_probe_interval = 0.05
    built.health_probe_timeout = 0.2
    yield built
    await built.stop(0)


async def test_health_gauges_follow_the_probes(handle: ServerHandle, registry: CollectorRegistry) -> None:
    dependency = Dependency()
    handle.watch_health(dependency.probe, name="database")

    def gauges() -> tuple[float | None, float | None]:
        return (
            registry.get_sample_value("agentplane_health_serving", {"service": "chat"}),
            registry.get_sample_value(
                "agentplane_health_dependency_up", {"service": "chat", "dependency": "database"}
            ),
        )

    await handle.start()
    await wait_until(gauges, until=lambda g: g == (1.0, 1.0), what="serving, database up")
    dependency.state = "down"
    await wait_until(gauges, until=lambda g: g == (0.0, 0.0), what="not serving, database down")
    dependency.state = "up"
    await wait_until(gauges, until=lambda g: g == (1.0, 1.0), what="serving again")
    await handle.stop(0)
    assert gauges()[0] == 0.0, "a stopped server is not serving"
    assert b"_created" not in generate_latest(registry)
