"""Fixtures for the config service tests: real servers on port 0 over the per-test Postgres and Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from agentplane.config.v1 import config_service_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common import auth
from services.common.client import create_channel
from services.common.settings import Settings
from services.config import server as config_server
from services.config.server import ConfigServer

StubFactory = Callable[[str], config_service_pb2_grpc.ConfigServiceStub]


@pytest.fixture
def channel_name() -> str:
    """A Redis invalidation channel of this test's own (pub/sub is server-wide)."""
    return f"test:config:{uuid.uuid4().hex}"


@pytest.fixture
async def config(settings: Settings, channel_name: str) -> AsyncIterator[ConfigServer]:
    """One started config server with its own metrics registry."""
    server = await config_server.start(settings, channel=channel_name, registry=CollectorRegistry())
    assert await server.bus.wait_subscribed(10)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def stub_for(config: ConfigServer) -> AsyncIterator[StubFactory]:
    """``stub_for(token)``: a ConfigService stub over a real channel authenticated with `token`."""
    channels = []

    def make(token: str) -> config_service_pb2_grpc.ConfigServiceStub:
        channel = create_channel(config.address, token=token)
        channels.append(channel)
        return config_service_pb2_grpc.ConfigServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


@pytest.fixture
def admin(stub_for: StubFactory, admin_token: str) -> config_service_pb2_grpc.ConfigServiceStub:
    """A stub acting as an admin."""
    return stub_for(admin_token)


@pytest.fixture
def alice(stub_for: StubFactory, user_token: str) -> config_service_pb2_grpc.ConfigServiceStub:
    """A stub acting as user alice."""
    return stub_for(user_token)


@pytest.fixture
def service_token(make_token: Callable[..., str]) -> Callable[[str], str]:
    """``service_token("chat")``: a token for a service identity."""
    return lambda name: make_token(auth.service_subject(name), auth.Role.SERVICE)
