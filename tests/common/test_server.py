"""The server factory, interceptors and client channel, end to end over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.common import auth, keys, logs
from services.common.client import create_channel
from services.common.errors import InvalidArgument, NotFound
from services.common.metrics import RpcMetrics, start_metrics_server
from services.common.rpc_errors import error_info, from_rpc_error
from services.common.server import ServerHandle, create_server, run_until_signal
from services.common.settings import SERVICE_NAMES
from tests.common.testsvc import SERVICE, TestServicer, method
from tests.helpers import RunningService, make_test_settings, running_server

SETTINGS = make_test_settings()


def build(servicer: TestServicer, registry: CollectorRegistry | None = None) -> ServerHandle:
    return create_server(
        SETTINGS,
        "chat",
        servicer.register,
        [SERVICE],
        metrics=RpcMetrics.for_registry(registry or CollectorRegistry()),
    )


@pytest.fixture
async def svc(user_token: str) -> AsyncIterator[RunningService]:
    async with running_server(build(TestServicer()), token=user_token) as running:
        yield running


async def call(channel: grpc.aio.Channel, name: str, request: bytes = b"", **kwargs: Any) -> bytes:
    result: bytes = await channel.unary_unary(method(name))(request, **kwargs)
    return result


async def _reflected_services(channel: grpc.aio.Channel) -> set[str]:
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names: set[str] = set()
    async for response in responses:
        names = {s.name for s in response.list_services_response.service}
    return names


async def test_health_without_token_reflection_with_one(svc: RunningService, user_token: str) -> None:
    channel = create_channel(svc.address)  # no token: health is exempt, nothing else
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _reflected_services(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
    authed = create_channel(svc.address, token=user_token)
    try:
        assert {SERVICE, "grpc.health.v1.Health"} <= await _reflected_services(authed)
    finally:
        await authed.close()


async def test_identity_reaches_servicer(svc: RunningService) -> None:
    who = json.loads(await call(svc.channel, "Whoami"))
    assert who["subject"] == "alice" and who["role"] == "user" and who["user_id"] == "alice"


async def reason_of(channel: grpc.aio.Channel, name: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(channel, name)
    decoded = error_info(info.value)
    assert decoded is not None, info.value
    return info.value.code(), decoded[0]


@pytest.mark.parametrize(
    ("token_kind", "reason"),
    [
        ("none", "TOKEN_MISSING"),
        ("expired", "TOKEN_EXPIRED"),
        ("forged", "TOKEN_INVALID"),
        ("junk", "TOKEN_MALFORMED"),
    ],
)
async def test_bad_tokens_are_unauthenticated(
    svc: RunningService, make_token: Callable[..., str], token_kind: str, reason: str
) -> None:
    token = {
        "none": None,
        "expired": make_token("alice", "user", ttl=-30),
        "forged": auth.mint_token(keys.from_dir(tempfile.mkdtemp(), SERVICE_NAMES), "alice", "admin"),
        "junk": "not-a-jwt",
    }[token_kind]
    channel = create_channel(svc.address, token=token)
    try:
        assert await reason_of(channel, "Whoami") == (grpc.StatusCode.UNAUTHENTICATED, reason)
    finally:
        await channel.close()


async def test_wrong_role_is_permission_denied(svc: RunningService, make_token: Callable[..., str]) -> None:
    assert await reason_of(svc.channel, "AdminOnly") == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    chat = create_channel(svc.address, token=make_token("service:chat", "service"))
    admin = create_channel(svc.address, token=make_token("root", "admin"))
    inference = create_channel(svc.address, token=make_token("service:inference", "service"))
    try:
        assert await call(admin, "AdminOnly") == b"root"
        assert await reason_of(chat, "InferenceOnly") == (
            grpc.StatusCode.PERMISSION_DENIED,
            "SERVICE_REQUIRED",
        )
        assert await call(inference, "InferenceOnly") == b"service:inference"
    finally:
        for c in (chat, admin, inference):
            await c.close()


async def test_on_behalf_of_only_from_services(svc: RunningService, make_token: Callable[..., str]) -> None:
    md = (("x-agentplane-on-behalf-of", "bob"),)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(svc.channel, "Whoami", metadata=md)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(info.value) == ("ON_BEHALF_OF_NOT_ALLOWED", {})
    service = create_channel(svc.address, token=make_token("service:chat", "service"))
    try:
        who = json.loads(await call(service, "Whoami", metadata=md))
        assert (who["subject"], who["acting_for"], who["user_id"]) == ("service:chat", "bob", "bob")
        with auth.acting_for("carol"):
            assert json.loads(await call(service, "Whoami"))["user_id"] == "carol"
    finally:
        await service.close()


async def test_domain_error_round_trip(svc: RunningService) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(svc.channel, "Fail")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "chat 1 not found"
    assert error_info(info.value) == ("CHAT_NOT_FOUND", {"chat_id": "1"})
    err = from_rpc_error(info.value)
    assert isinstance(err, NotFound) and err.reason == "CHAT_NOT_FOUND" and err.metadata == {"chat_id": "1"}
    assert err.domain == "agentplane.chat.v1"

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(svc.channel, "Invalid")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in (info.value.details() or "")
    invalid = from_rpc_error(info.value)
    assert isinstance(invalid, InvalidArgument) and invalid.field == "page_size"


async def test_unexpected_exception_is_internal_and_generic(svc: RunningService) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(svc.channel, "Crash")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in (info.value.details() or "")


async def test_streaming_rpc_and_streaming_error(svc: RunningService) -> None:
    stream = svc.channel.unary_stream(method("Stream"))
    assert [item async for item in stream(b"3")] == [b"0", b"1", b"2"]
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in stream(b"2"):
            received.append(item)
    assert received == [b"0", b"1"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(info.value) == ("NOT_FOUND", {})


async def test_request_id_and_user_carried_across_hops(
    user_token: str, make_token: Callable[..., str]
) -> None:
    async with running_server(build(TestServicer())) as backend:
        front = TestServicer(
            forward_address=backend.address, forward_token=make_token("service:chat", "service")
        )
        async with running_server(build(front), token=user_token) as frontend:
            with logs.request_id_scope("rid-1234"):
                who = json.loads(await call(frontend.channel, "Forward"))
            assert who["request_id"] == "rid-1234"
            assert (who["subject"], who["acting_for"]) == ("service:chat", "alice")
            # Without an incoming id the server makes one, and still forwards it.
            who = json.loads(await call(frontend.channel, "Forward"))
            assert who["request_id"] and who["request_id"] != "rid-1234"


async def test_metrics_count_calls_by_code(user_token: str) -> None:
    registry = CollectorRegistry()
    async with running_server(build(TestServicer(), registry), token=user_token) as svc:
        await call(svc.channel, "Echo", b"x")
        await call(svc.channel, "Echo", b"y")
        with pytest.raises(grpc.aio.AioRpcError):
            await call(svc.channel, "Fail")
        assert [x async for x in svc.channel.unary_stream(method("Stream"))(b"1")] == [b"0"]
        metrics = start_metrics_server(0, "127.0.0.1", registry)
        try:
            url = f"http://127.0.0.1:{metrics.port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            metrics.stop()
    samples = [s for family in text_string_to_metric_families(body) for s in family.samples]

    def sample(name: str, rpc: str, code: str | None = None) -> float:
        wanted = {"service": SERVICE, "method": rpc, **({"code": code} if code else {})}
        return next(s.value for s in samples if s.name == name and s.labels == wanted)

    assert sample("agentplane_rpc_requests_total", "Echo", "OK") == 2
    assert sample("agentplane_rpc_requests_total", "Fail", "NOT_FOUND") == 1
    assert sample("agentplane_rpc_requests_total", "Stream", "OK") == 1
    assert sample("agentplane_rpc_latency_seconds_count", "Echo") == 2
    assert sample("agentplane_rpc_in_flight", "Echo") == 0


def test_two_servers_share_default_registry_without_crashing() -> None:
    a = RpcMetrics.for_registry()
    b = RpcMetrics.for_registry()
    assert a is b
    build(TestServicer(), None)
    build(TestServicer(), None)


async def test_sigterm_drains_in_flight_and_refuses_new_calls(user_token: str) -> None:
    servicer = TestServicer()
    handle = build(servicer)
    await handle.start()
    channel = create_channel(handle.address, token=user_token, retries=False)
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.create_task(call(channel, "Slow"))
        await servicer.slow_started.wait()
        ready = asyncio.Event()
        runner = asyncio.create_task(run_until_signal(handle, grace=30, on_ready=ready.set))
        await ready.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        update = await watch.read()
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(channel, "Echo", b"late")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not in_flight.done()
        servicer.slow_release.set()
        assert await in_flight == b"done"
        await runner
    finally:
        await channel.close()
        await handle.stop(0)
