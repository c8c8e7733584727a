"""Fixtures for the inference tests: the simulator, a real config server and a real inference server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
import pytest
from agentplane.config.v1 import config_pb2
from agentplane.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common import auth
from services.common.client import create_channel
from services.common.server import ServerHandle
from services.common.settings import Settings
from services.config import server as config_server
from services.config.client import ConfigClient
from services.config.server import ConfigServer
from services.config.testing import seed_provider_and_model
from services.inference import server as inference_server
from services.inference.settings import InferenceSettings
from services.simulator.server import SimulatorHandle, start_simulator

SIM_KEY = "sk-sim-correct-key-0123456789"
# Fast retries so fault tests stay quick; the policy itself is tested in test_domain.py.
TEST_INFERENCE_SETTINGS = InferenceSettings(
    coalesce_ms=20, max_attempts=3, retry_base_ms=10, retry_max_delay_ms=50, retry_budget_s=5
)


@dataclass
class Stack:
    """The simulator, config and inference servers of one test, and a stub with the chat service's token."""

    sim: SimulatorHandle
    config: ConfigServer
    inference: ServerHandle
    admin_token: str
    make_token: Callable[..., str]
    stub: inference_service_pb2_grpc.InferenceServiceStub
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def model(
        self,
        provider_type: int = config_pb2.PROVIDER_TYPE_OPENAI,
        *,
        api_key: str = SIM_KEY,
        model_name: str = "sim-gpt",
        make_default: bool = False,
        **kwargs: Any,
    ) -> str:
        """Seed a provider pointed at the simulator and a model on it; returns the model config id."""
        base_url = (
            self.sim.anthropic_base_url
            if provider_type == config_pb2.PROVIDER_TYPE_ANTHROPIC
            else self.sim.openai_base_url
        )
        _, model_id = await seed_provider_and_model(
            self.config.address,
            self.admin_token,
            provider_type=provider_type,
            base_url=base_url,
            api_key=api_key,
            model_name=model_name,
            make_default=make_default,
            **kwargs,
        )
        return model_id

    def stub_with(self, token: str) -> inference_service_pb2_grpc.InferenceServiceStub:
        """Another stub to the inference server, authenticated with `token`."""
        channel = create_channel(self.inference.address, token=token)
        self.channels.append(channel)
        return inference_service_pb2_grpc.InferenceServiceStub(channel)

    async def generate(self, request: inference_service_pb2.GenerateRequest) -> list[Any]:
        """Run Generate to the end and return its events."""
        return [event async for event in self.stub.Generate(request, timeout=30)]


@pytest.fixture
async def stack(settings: Settings, admin_token: str, make_token: Callable[..., str]) -> AsyncIterator[Stack]:
    """Simulator (expecting SIM_KEY) + config server + inference server using the real ConfigClient."""
    channel = f"test:config:{uuid.uuid4().hex}"
    sim = await start_simulator(expected_api_key=SIM_KEY)
    config = await config_server.start(settings, channel=channel, registry=CollectorRegistry())
    wired = settings.with_service("config", address=config.address)
    client = ConfigClient(
        config.address,
        auth.ServiceTokenProvider(settings.keys, "inference"),
        redis_url=settings.redis_url,
        channel=channel,
        registry=CollectorRegistry(),
    )
    await client.start()
    inference = await inference_server.start(wired, TEST_INFERENCE_SETTINGS, resolver=client)
    stack = Stack(sim, config, inference, admin_token, make_token, None)  # type: ignore[arg-type]
    stack.stub = stack.stub_with(make_token("service:chat", auth.Role.SERVICE))
    try:
        yield stack
    finally:
        for ch in stack.channels:
            await ch.close()
        await inference.stop(0)
        await client.close()
        await config.stop()
        await sim.stop()
