"""Placeholder config server: the generated base servicer, so every RPC answers UNIMPLEMENTED.

The config service's engineer replaces this; keep the two entry points (see docs/kit.md).
"""

from __future__ import annotations

import grpc
import grpc.aio
from agentplane.config.v1 import config_service_pb2_grpc

from services.common.server import ServerHandle, create_server, run_service
from services.common.settings import Settings

SERVICE_NAME = "config"
FULL_SERVICE_NAMES = ["agentplane.config.v1.ConfigService"]


async def build(settings: Settings) -> ServerHandle:
    """Build (not start) the config server bound to its configured port."""

    def register(server: grpc.aio.Server) -> None:
        servicer = config_service_pb2_grpc.ConfigServiceServicer()  # type: ignore[abstract]
        config_service_pb2_grpc.add_ConfigServiceServicer_to_server(servicer, server)

    return create_server(settings, SERVICE_NAME, register, FULL_SERVICE_NAMES)


async def serve(settings: Settings) -> None:
    """Run the config service until SIGTERM/SIGINT."""
    await run_service(settings, SERVICE_NAME, build)
