"""First-run providers for `agentplane up`, so a fresh deployment can chat at once.

Only when the deployment has no provider yet: `OPENAI_API_KEY` and `ANTHROPIC_API_KEY` each
become a provider with one model (names from `AGENTPLANE_OPENAI_MODEL` /
`AGENTPLANE_ANTHROPIC_MODEL`); with neither, the LLM simulator (started by `up`) becomes the
provider of a default model, so the product works offline. Nothing is changed on later runs:
providers are then managed with `agentplane admin provider|model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc

from services.common.client import create_channel
from services.config.testing import seed_provider_and_model

DEFAULT_OPENAI_MODEL = "gpt-4.1"
DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5"
SIMULATOR_API_KEY = "sk-agentplane-simulator"


@dataclass(frozen=True)
class SeedPlan:
    """One provider + model to create."""

    label: str
    provider_type: int
    base_url: str
    api_key: str
    model_name: str
    context_limit: int


def plan(env: Mapping[str, str], simulator_url: str | None) -> list[SeedPlan]:
    """The providers to create for `env`; the simulator only when no real key is given."""
    plans: list[SeedPlan] = []
    if env.get("OPENAI_API_KEY"):
        plans.append(
            SeedPlan(
                "openai",
                config_pb2.PROVIDER_TYPE_OPENAI,
                env.get("OPENAI_BASE_URL", ""),
                env["OPENAI_API_KEY"],
                env.get("AGENTPLANE_OPENAI_MODEL", DEFAULT_OPENAI_MODEL),
                1_000_000,
            )
        )
    if env.get("ANTHROPIC_API_KEY"):
        plans.append(
            SeedPlan(
                "anthropic",
                config_pb2.PROVIDER_TYPE_ANTHROPIC,
                env.get("ANTHROPIC_BASE_URL", ""),
                env["ANTHROPIC_API_KEY"],
                env.get("AGENTPLANE_ANTHROPIC_MODEL", DEFAULT_ANTHROPIC_MODEL),
                200_000,
            )
        )
    if not plans and simulator_url:
        plans.append(
            SeedPlan(
                "simulator",
                config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
                simulator_url.rstrip("/") + "/v1",
                SIMULATOR_API_KEY,
                "sim-model",
                128_000,
            )
        )
    return plans


async def has_providers(config_address: str, admin_token: str) -> bool:
    """Whether the deployment already has at least one provider."""
    async with create_channel(config_address, token=admin_token) as channel:
        stub = config_service_pb2_grpc.ConfigServiceStub(channel)
        reply = await stub.ListProviders(config_service_pb2.ListProvidersRequest(page_size=1), timeout=30)
        return bool(reply.providers)


async def seed(config_address: str, admin_token: str, plans: list[SeedPlan]) -> list[str]:
    """Create the planned providers and models (the first model becomes the default)."""
    created = []
    for index, item in enumerate(plans):
        _, model_id = await seed_provider_and_model(
            config_address,
            admin_token,
            provider_type=item.provider_type,
            base_url=item.base_url,
            api_key=item.api_key,
            model_name=item.model_name,
            context_limit=item.context_limit,
            make_default=index == 0,
        )
        created.append(f"{item.label}: model {item.model_name} ({model_id})")
    return created
