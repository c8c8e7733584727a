"""Health follows dependencies: `ServerHandle.watch_health` with a probe we control, and a config
server whose real Postgres is stopped and started again."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common.client import create_channel
from services.common.embedded import EmbeddedPostgres, start_postgres
from services.common.migrations import migrate
from services.common.server import ServerHandle, create_server
from services.config import server as config_server
from tests.common.testsvc import SERVICE, TestServicer
from tests.helpers import make_test_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_for_status(channel: grpc.aio.Channel, status: int, *, within: float = 30.0) -> None:
    """Follow the health Watch stream of the server ("") until it reports `status`."""

    async def follow() -> None:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for reply in stream:
                if reply.status == status:
                    return
        finally:
            stream.cancel()
        raise AssertionError("the health Watch stream ended")

    await asyncio.wait_for(follow(), within)


async def statuses(channel: grpc.aio.Channel, names: list[str]) -> set[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    replies = [await stub.Check(health_pb2.HealthCheckRequest(service=n), timeout=5) for n in names]
    return {r.status for r in replies}


class Dependency:
    """A probe's answer, set by the test: up, down (raises), or hung (never returns)."""

    def __init__(self) -> None:
        self.state = "up"
        self.probed = asyncio.Event()

    async def probe(self) -> None:
        self.probed.set()
        if self.state == "down":
            raise ConnectionError("the dependency is down")
        if self.state == "hung":
            await asyncio.Event().wait()


@pytest.fixture
async def handle() -> AsyncIterator[ServerHandle]:
    built = create_server(make_test_settings(), "chat", TestServicer().register, [SERVICE])
    built.health_probe_interval = 0.05
    built.health_probe_timeout = 0.2
    yield built
    await built.stop(0)


async def test_health_goes_not_serving_while_a_probe_fails_and_serving_when_it_passes(
    handle: ServerHandle,
) -> None:
    dependency = Dependency()
    handle.watch_health(dependency.probe)
    await handle.start()
    channel = create_channel(handle.address)
    try:
        await wait_for_status(channel, SERVING)
        for state in ("down", "hung"):
            dependency.state = state
            await wait_for_status(channel, NOT_SERVING)
            assert await statuses(channel, ["", SERVICE]) == {NOT_SERVING}
            # Liveness (what Kubernetes restarts on) stays up: only readiness follows the dependency.
            assert await statuses(channel, ["liveness"]) == {SERVING}
            dependency.state = "up"
            await wait_for_status(channel, SERVING)
            assert await statuses(channel, ["", SERVICE]) == {SERVING}
    finally:
        await channel.close()


async def test_stopping_the_server_stops_its_probes(handle: ServerHandle) -> None:
    dependency = Dependency()
    handle.watch_health(dependency.probe)
    await handle.start()
    await asyncio.wait_for(dependency.probed.wait(), 10)
    await handle.stop(0)
    assert handle._prober is not None and handle._prober.done()


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A Postgres of this test's own, which it stops and starts (not the session's)."""
    root = Path(tempfile.mkdtemp(prefix="agentplane-test-health-"))
    root.chmod(0o755)  # the embedded server runs as its own system user when we are root
    server = start_postgres(root / "data")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def start_again(postgres: EmbeddedPostgres) -> None:
    """Start the stopped server in place (same data, same socket, same URL)."""
    wheel_server = postgres._server
    with wheel_server._lock:
        wheel_server.ensure_postgres_running()


@pytest.mark.timeout(120)
async def test_config_health_follows_its_database(own_postgres: EmbeddedPostgres, redis_url: str) -> None:
    await migrate(own_postgres.url)
    settings = make_test_settings(database_url=own_postgres.url, redis_url=redis_url)
    server = await config_server.build_server(
        settings, channel=f"test:config:{uuid.uuid4().hex}", registry=CollectorRegistry()
    )
    server.handle.health_probe_interval = 0.1
    await server.handle.start()
    channel = create_channel(server.address)
    names = ["", *config_server.FULL_SERVICE_NAMES]
    try:
        await wait_for_status(channel, SERVING)
        assert await statuses(channel, names) == {SERVING}

        await asyncio.to_thread(own_postgres.stop)
        await wait_for_status(channel, NOT_SERVING)
        assert await statuses(channel, names) == {NOT_SERVING}

        await asyncio.to_thread(start_again, own_postgres)
        # The pool reconnects with backoff (1 s, 2 s, ...): SERVING within seconds of the database.
        await wait_for_status(channel, SERVING, within=60)
        assert await statuses(channel, names) == {SERVING}
    finally:
        await channel.close()
        await server.stop(0)
