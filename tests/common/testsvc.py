"""A tiny generic-handler service (bytes in, bytes out) for exercising the kit without gen/."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from services.common import auth, logs
from services.common.client import create_channel
from services.common.errors import InvalidArgument, NotFound

SERVICE = "agentplane.test.v1.TestService"


def method(name: str) -> str:
    """Full method path of `name`."""
    return f"/{SERVICE}/{name}"


@dataclass
class TestServicer:
    __test__ = False  # not a pytest test class

    """Behaviours of the test service; `slow_started`/`slow_release` coordinate shutdown tests."""

    forward_address: str | None = None
    forward_token: str | None = None
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    slow_release: asyncio.Event = field(default_factory=asyncio.Event)

    async def whoami(self, request: bytes, context: Any) -> bytes:
        identity = auth.optional_identity()
        return json.dumps(
            {
                "subject": identity.subject if identity else None,
                "role": identity.role.value if identity else None,
                "acting_for": identity.acting_for if identity else None,
                "user_id": identity.user_id if identity else None,
                "request_id": logs.current_request_id(),
            }
        ).encode()

    async def echo(self, request: bytes, context: Any) -> bytes:
        return request

    async def fail(self, request: bytes, context: Any) -> bytes:
        raise NotFound("chat 1 not found", reason="CHAT_NOT_FOUND", metadata={"chat_id": "1"})

    async def invalid(self, request: bytes, context: Any) -> bytes:
        raise InvalidArgument("page_size", "must be between 1 and 100")

    async def crash(self, request: bytes, context: Any) -> bytes:
        raise RuntimeError("secret internals: do not leak")

    async def admin_only(self, request: bytes, context: Any) -> bytes:
        return auth.require_admin().subject.encode()

    async def inference_only(self, request: bytes, context: Any) -> bytes:
        return auth.require_service("inference").subject.encode()

    async def slow(self, request: bytes, context: Any) -> bytes:
        self.slow_started.set()
        await self.slow_release.wait()
        return b"done"

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        count = int(request or b"3")
        for i in range(count):
            yield str(i).encode()
        if request == b"2":
            raise NotFound("stream ran out")

    async def forward(self, request: bytes, context: Any) -> bytes:
        assert self.forward_address is not None
        channel = create_channel(self.forward_address, token=self.forward_token)
        try:
            result: bytes = await channel.unary_unary(method("Whoami"))(b"")
            return result
        finally:
            await channel.close()

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Whoami": unary(self.whoami),
                "Echo": unary(self.echo),
                "Fail": unary(self.fail),
                "Invalid": unary(self.invalid),
                "Crash": unary(self.crash),
                "AdminOnly": unary(self.admin_only),
                "InferenceOnly": unary(self.inference_only),
                "Slow": unary(self.slow),
                "Forward": unary(self.forward),
                "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            },
        )

    def register(self, server: grpc.aio.Server) -> None:
        """Pass to `create_server` as `register`."""
        server.add_generic_rpc_handlers((self.handler(),))
