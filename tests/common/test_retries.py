"""Channel retries, per method, against a real server: only methods safe to repeat are retried.

The test server registers handlers under our real method names and counts the attempts that reach
each one. An UNAVAILABLE sent with `context.abort` stands for a call that never reached a working
handler (a server shutting down, a proxy); one raised as a domain error (`Unavailable`, through
the kit's ErrorInterceptor) is a handler's own answer and carries retry pushback -1.
"""

from __future__ import annotations

import collections
import importlib
import pkgutil
from collections.abc import AsyncIterator
from typing import Any

import agentplane
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from services.common.client import NOT_RETRIED_METHODS, RETRIED_METHODS, create_channel
from services.common.errors import NotFound, Unavailable
from services.common.metrics import RpcMetrics
from services.common.rpc_errors import RETRY_PUSHBACK_KEY, error_info, to_status
from services.common.server import create_server
from tests.helpers import RunningService, make_test_settings, running_server

SETTINGS = make_test_settings()

GET_PROVIDER = "/agentplane.config.v1.ConfigService/GetProvider"  # a read
CREATE_CHAT = "/agentplane.chat.v1.ChatService/CreateChat"  # idempotent by request_id
INTERRUPT_CHAT = "/agentplane.chat.v1.ChatService/InterruptChat"  # a state change
GENERATE = "/agentplane.inference.v1.InferenceService/Generate"  # a paid provider call, streamed
LIST_PROVIDER_MODELS = "/agentplane.inference.v1.InferenceService/ListProviderModels"  # a read
STREAM_CHAT = "/agentplane.chat.v1.ChatService/StreamChat"  # a resumable stream


class Flaky:
    """Handlers that fail their first attempt in a chosen way and count every attempt."""

    def __init__(self) -> None:
        self.attempts: collections.Counter[str] = collections.Counter()

    async def refuse_first(self, name: str, context: Any) -> None:
        self.attempts[name] += 1
        if self.attempts[name] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not serving yet")

    def unary_refusing_first(self, name: str) -> grpc.RpcMethodHandler:
        async def handle(request: bytes, context: Any) -> bytes:
            await self.refuse_first(name, context)
            return b"ok"

        return grpc.unary_unary_rpc_method_handler(handle)

    def stream_refusing_first(self, name: str) -> grpc.RpcMethodHandler:
        async def handle(request: bytes, context: Any) -> AsyncIterator[bytes]:
            await self.refuse_first(name, context)
            yield b"ok"

        return grpc.unary_stream_rpc_method_handler(handle)

    def unary_handler_unavailable(self, name: str) -> grpc.RpcMethodHandler:
        async def handle(request: bytes, context: Any) -> bytes:
            self.attempts[name] += 1
            raise Unavailable("the provider is unavailable", reason="PROVIDER_UNAVAILABLE")

        return grpc.unary_unary_rpc_method_handler(handle)

    def stream_failing_after_output(self, name: str) -> grpc.RpcMethodHandler:
        async def handle(request: bytes, context: Any) -> AsyncIterator[bytes]:
            self.attempts[name] += 1
            yield b"partial"
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost midway")

        return grpc.unary_stream_rpc_method_handler(handle)

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            GET_PROVIDER: self.unary_refusing_first(GET_PROVIDER),
            CREATE_CHAT: self.unary_refusing_first(CREATE_CHAT),
            INTERRUPT_CHAT: self.unary_refusing_first(INTERRUPT_CHAT),
            GENERATE: self.stream_refusing_first(GENERATE),
            LIST_PROVIDER_MODELS: self.unary_handler_unavailable(LIST_PROVIDER_MODELS),
            STREAM_CHAT: self.stream_failing_after_output(STREAM_CHAT),
        }
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = collections.defaultdict(dict)
        for path, handler in handlers.items():
            service, method = path.strip("/").split("/")
            by_service[service][method] = handler
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(s, methods) for s, methods in by_service.items()]
        )


@pytest.fixture
async def flaky(user_token: str) -> AsyncIterator[tuple[Flaky, RunningService]]:
    servicer = Flaky()
    handle = create_server(
        SETTINGS,
        "chat",
        servicer.register,
        ["agentplane.config.v1.ConfigService"],
        metrics=RpcMetrics.for_registry(CollectorRegistry()),
    )
    async with running_server(handle, token=user_token) as running:
        yield servicer, running


async def test_safe_methods_are_retried(flaky: tuple[Flaky, RunningService]) -> None:
    servicer, svc = flaky
    assert await svc.channel.unary_unary(GET_PROVIDER)(b"") == b"ok"
    assert await svc.channel.unary_unary(CREATE_CHAT)(b"") == b"ok"
    assert servicer.attempts[GET_PROVIDER] == 2
    assert servicer.attempts[CREATE_CHAT] == 2


async def test_methods_unsafe_to_repeat_are_not_retried(flaky: tuple[Flaky, RunningService]) -> None:
    servicer, svc = flaky
    with pytest.raises(grpc.aio.AioRpcError) as interrupt:
        await svc.channel.unary_unary(INTERRUPT_CHAT)(b"")
    assert interrupt.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as generate:
        async for _ in svc.channel.unary_stream(GENERATE)(b""):
            pass
    assert generate.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts[INTERRUPT_CHAT] == 1
    assert servicer.attempts[GENERATE] == 1


async def test_a_handlers_own_unavailable_is_not_retried_even_on_a_safe_method(
    flaky: tuple[Flaky, RunningService],
) -> None:
    servicer, svc = flaky
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.channel.unary_unary(LIST_PROVIDER_MODELS)(b"")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(info.value) == ("PROVIDER_UNAVAILABLE", {})
    assert servicer.attempts[LIST_PROVIDER_MODELS] == 1


async def test_a_stream_that_delivered_output_is_never_retried(flaky: tuple[Flaky, RunningService]) -> None:
    servicer, svc = flaky
    received: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in svc.channel.unary_stream(STREAM_CHAT)(b""):
            received.append(message)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert received == [b"partial"] and servicer.attempts[STREAM_CHAT] == 1


async def test_without_retries_even_safe_methods_fail_at_once(
    flaky: tuple[Flaky, RunningService], user_token: str
) -> None:
    servicer, svc = flaky
    channel = create_channel(svc.address, token=user_token, retries=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(GET_PROVIDER)(b"")
    finally:
        await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts[GET_PROVIDER] == 1


def test_only_unavailable_carries_retry_pushback() -> None:
    unavailable = to_status(Unavailable("down", reason="DATABASE_UNAVAILABLE"))
    assert (RETRY_PUSHBACK_KEY, "-1") in unavailable.trailing_metadata
    not_found = to_status(NotFound("gone", reason="CHAT_NOT_FOUND"))
    assert all(key != RETRY_PUSHBACK_KEY for key, _ in not_found.trailing_metadata)


def _all_methods() -> set[str]:
    """Every method of every service in gen/, plus health, as ``service/method``."""
    found = {
        f"grpc.health.v1.Health/{m.name}" for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods
    }
    for module in pkgutil.walk_packages(agentplane.__path__, "agentplane."):
        if not module.name.endswith("_pb2"):
            continue
        descriptor = importlib.import_module(module.name).DESCRIPTOR
        for service in descriptor.services_by_name.values():
            found |= {f"{service.full_name}/{m.name}" for m in service.methods}
    return found


def test_every_method_has_a_retry_decision() -> None:
    retried = {f"{s}/{m}" for s, methods in RETRIED_METHODS.items() for m in methods}
    not_retried = {f"{s}/{m}" for s, methods in NOT_RETRIED_METHODS.items() for m in methods}
    assert not retried & not_retried
    everything = _all_methods()
    assert len(everything) > 50  # the walk found the services
    assert everything == retried | not_retried, (
        "add each new RPC to RETRIED_METHODS (safe to repeat) or NOT_RETRIED_METHODS in "
        "services/common/client.py"
    )
