"""Placeholder chat server: the generated base servicer, so every RPC answers UNIMPLEMENTED.

The chat service's engineer replaces this; keep the two entry points (see docs/kit.md).
"""

from __future__ import annotations

import grpc
import grpc.aio
from agentplane.chat.v1 import chat_service_pb2_grpc

from services.common.server import ServerHandle, create_server, run_service
from services.common.settings import Settings

SERVICE_NAME = "chat"
FULL_SERVICE_NAMES = ["agentplane.chat.v1.ChatService"]


async def build(settings: Settings) -> ServerHandle:
    """Build (not start) the chat server bound to its configured port."""

    def register(server: grpc.aio.Server) -> None:
        servicer = chat_service_pb2_grpc.ChatServiceServicer()  # type: ignore[abstract]
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)

    return create_server(settings, SERVICE_NAME, register, FULL_SERVICE_NAMES)


async def serve(settings: Settings) -> None:
    """Run the chat service until SIGTERM/SIGINT."""
    await run_service(settings, SERVICE_NAME, build)
