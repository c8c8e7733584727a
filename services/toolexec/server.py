"""Placeholder toolexec server: the generated base servicer, so every RPC answers UNIMPLEMENTED.

The toolexec service's engineer replaces this; keep the two entry points (see docs/kit.md).
"""

from __future__ import annotations

import grpc
import grpc.aio
from agentplane.toolexec.v1 import toolexec_service_pb2_grpc

from services.common.server import ServerHandle, create_server, run_service
from services.common.settings import Settings

SERVICE_NAME = "toolexec"
FULL_SERVICE_NAMES = ["agentplane.toolexec.v1.ToolExecService"]


async def build(settings: Settings) -> ServerHandle:
    """Build (not start) the toolexec server bound to its configured port."""

    def register(server: grpc.aio.Server) -> None:
        servicer = toolexec_service_pb2_grpc.ToolExecServiceServicer()  # type: ignore[abstract]
        toolexec_service_pb2_grpc.add_ToolExecServiceServicer_to_server(servicer, server)

    return create_server(settings, SERVICE_NAME, register, FULL_SERVICE_NAMES)


async def serve(settings: Settings) -> None:
    """Run the toolexec service until SIGTERM/SIGINT."""
    await run_service(settings, SERVICE_NAME, build)
