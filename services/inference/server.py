"""Placeholder inference server: the generated base servicer, so every RPC answers UNIMPLEMENTED.

The inference service's engineer replaces this; keep the two entry points (see docs/kit.md).
"""

from __future__ import annotations

import grpc
import grpc.aio
from agentplane.inference.v1 import inference_service_pb2_grpc

from services.common.server import ServerHandle, create_server, run_service
from services.common.settings import Settings

SERVICE_NAME = "inference"
FULL_SERVICE_NAMES = ["agentplane.inference.v1.InferenceService"]


async def build(settings: Settings) -> ServerHandle:
    """Build (not start) the inference server bound to its configured port."""

    def register(server: grpc.aio.Server) -> None:
        servicer = inference_service_pb2_grpc.InferenceServiceServicer()  # type: ignore[abstract]
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    return create_server(settings, SERVICE_NAME, register, FULL_SERVICE_NAMES)


async def serve(settings: Settings) -> None:
    """Run the inference service until SIGTERM/SIGINT."""
    await run_service(settings, SERVICE_NAME, build)
