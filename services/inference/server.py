"""The inference server: `build(settings)` for tests and `agentplane serve inference`, and `serve(settings)`.

The model resolver is the config service's cached client (`ConfigClient`), dialled at
`settings.address("config")` with the inference service's own service token.
"""

from __future__ import annotations

import grpc
import grpc.aio
from agentplane.inference.v1 import inference_service_pb2_grpc

from services.common import auth
from services.common.server import ServerHandle, create_server, run_service
from services.common.settings import Settings
from services.inference.generate import Generator
from services.inference.resolver import ModelResolver
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings

SERVICE_NAME = "inference"
FULL_SERVICE_NAMES = ["agentplane.inference.v1.InferenceService"]


async def build(
    settings: Settings,
    inference_settings: InferenceSettings | None = None,
    resolver: ModelResolver | None = None,
) -> ServerHandle:
    """Build (not start) the inference server bound to its configured port (0 in tests).

    Without `resolver`, a `ConfigClient` to the config service is created and closed with the server.
    """
    from services.config.client import ConfigClient
    from services.tokens.wiring import follow_config

    config_client: ConfigClient | None = None
    is_revoked = None
    stop_revocations = None
    if resolver is None:
        revocations, stop_revocations = await follow_config(settings, SERVICE_NAME)
        is_revoked = revocations.is_revoked
        config_client = ConfigClient(
            settings.address("config"),
            auth.ServiceTokenProvider(settings.keys, SERVICE_NAME),
            redis_url=settings.redis_url,
        )
        await config_client.start()
        resolver = config_client
    generator = Generator(resolver, inference_settings or InferenceSettings.from_env())

    def register(server: grpc.aio.Server) -> None:
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(generator), server
        )

    handle = create_server(settings, SERVICE_NAME, register, FULL_SERVICE_NAMES, is_revoked=is_revoked)
    handle.on_stop(generator.clients.close)
    if stop_revocations is not None:
        handle.on_stop(stop_revocations)
    if config_client is not None:
        handle.on_stop(config_client.close)
    return handle


async def serve(settings: Settings) -> None:
    """Run the inference service until SIGTERM/SIGINT."""
    await run_service(settings, SERVICE_NAME, build)


async def start(
    settings: Settings,
    inference_settings: InferenceSettings | None = None,
    resolver: ModelResolver | None = None,
) -> ServerHandle:
    """Build and start the inference server; `handle.port` is the bound port; `await handle.stop()`."""
    handle = await build(settings, inference_settings, resolver)
    await handle.start()
    return handle
