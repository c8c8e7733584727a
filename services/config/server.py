"""Building and running the config server (`agentplane serve config`, tests, benchmarks).

`build(settings)` returns a bound, not yet started `ServerHandle` (the kit's convention, used by
`tests.helpers.serve_in_process` and `agentplane serve config`). `build_server` / `start` return a
`ConfigServer`, which also exposes the domain service, the invalidation bus and the metrics
(tests and the benchmark look at them).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import grpc.aio
from agentplane.config.v1 import config_service_pb2_grpc, token_service_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common import db
from services.common.metrics import RpcMetrics
from services.common.server import ServerHandle, create_server, run_service
from services.common.settings import Settings
from services.config.crypto import KeyRing
from services.config.invalidation import DEFAULT_CHANNEL, InvalidationBus
from services.config.metrics import ConfigMetrics
from services.config.service import CacheSettings, ConfigService
from services.config.servicer import ConfigServicer
from services.config.store import ConfigStore
from services.tokens.revocations import RevocationList, RevocationPoller
from services.tokens.servicer import TokenServicer
from services.tokens.store import RevocationStore
from services.tokens.wiring import from_store

SERVICE_NAME = "config"
FULL_SERVICE_NAMES = ["agentplane.config.v1.ConfigService", "agentplane.config.v1.TokenService"]


@dataclass
class ConfigServer:
    """A built config server: the handle plus the parts tests and benchmarks look at."""

    handle: ServerHandle
    service: ConfigService
    bus: InvalidationBus
    metrics: ConfigMetrics

    @property
    def port(self) -> int:
        """The bound port."""
        return self.handle.port

    @property
    def address(self) -> str:
        """`127.0.0.1:<port>` to dial."""
        return self.handle.address

    async def stop(self, grace: float | None = 0) -> None:
        """Stop serving and close the database pool and Redis connections."""
        await self.handle.stop(grace)


async def build_server(
    settings: Settings,
    *,
    cache: CacheSettings | None = None,
    channel: str = DEFAULT_CHANNEL,
    registry: CollectorRegistry | None = None,
) -> ConfigServer:
    """Build (not start) a config server from `settings` on its configured port (0 = ephemeral).

    `cache` defaults to `CacheSettings.from_env()`; `channel` is the Redis invalidation channel
    (tests use a unique one); `registry` holds its metrics (default: the global registry).
    """
    metrics = ConfigMetrics.for_registry(registry)
    keyring = KeyRing.from_settings(settings)
    pool = await db.create_pool(settings.require_database_url(), name="config")
    service = ConfigService(
        ConfigStore(pool, metrics), keyring, cache=cache or CacheSettings.from_env(), metrics=metrics
    )
    bus = InvalidationBus(settings.redis_url, service.apply_invalidation, channel=channel, metrics=metrics)
    service.bus = bus

    revocation_store = RevocationStore(pool)
    revocations = RevocationList()
    poller = RevocationPoller(revocations, from_store(revocation_store), settings.revocation_refresh_seconds)

    def register(server: grpc.aio.Server) -> None:
        config_service_pb2_grpc.add_ConfigServiceServicer_to_server(ConfigServicer(service), server)
        token_service_pb2_grpc.add_TokenServiceServicer_to_server(
            TokenServicer(revocation_store, revocations, settings.max_token_lifetime_seconds), server
        )

    handle = create_server(
        settings,
        SERVICE_NAME,
        register,
        FULL_SERVICE_NAMES,
        metrics=RpcMetrics.for_registry(registry),
        is_revoked=revocations.is_revoked,
    )
    await bus.start()
    poller.start()
    handle.watch_health(db.probe(pool))
    handle.on_stop(pool.close)
    handle.on_stop(bus.close)
    handle.on_stop(poller.stop)
    return ConfigServer(handle, service, bus, metrics)


async def start(
    settings: Settings,
    *,
    cache: CacheSettings | None = None,
    channel: str = DEFAULT_CHANNEL,
    registry: CollectorRegistry | None = None,
) -> ConfigServer:
    """Build and start a config server; `await server.stop()` when done."""
    server = await build_server(settings, cache=cache, channel=channel, registry=registry)
    await server.handle.start()
    return server


async def build(settings: Settings) -> ServerHandle:
    """Build (not start) the config server: the kit's `build(settings) -> ServerHandle` convention."""
    return (await build_server(settings)).handle


async def serve(settings: Settings) -> None:
    """Run the config service until SIGTERM/SIGINT (`agentplane serve config`)."""
    await run_service(settings, SERVICE_NAME, build)
