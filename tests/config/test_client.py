"""ConfigClient against a real config server: caching, invalidation, errors, and the seeding helper."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from google.protobuf import field_mask_pb2

from services.common.errors import NotFound, PermissionDenied
from services.config.client import ConfigClient
from services.config.server import ConfigServer
from services.config.testing import seed_provider_and_model
from tests.config.conftest import StubFactory
from tests.helpers import wait_until


async def test_client_resolves_default_and_serves_hits_without_rpcs(
    config: ConfigServer, admin_token: str, service_token: Callable[[str], str], channel_name: str, settings
) -> None:
    provider_id, model_id = await seed_provider_and_model(
        config.address, admin_token, base_url="http://127.0.0.1:9/v1", api_key="sk-seed-1234", model_name="m1"
    )
    client = ConfigClient(
        config.address, service_token("chat"), redis_url=settings.redis_url, channel=channel_name
    )
    await client.start()
    try:
        assert await client.bus.wait_subscribed(10)
        resolved = await client.resolve_model()
        assert resolved.model_config.id == model_id
        assert resolved.provider.id == provider_id
        assert resolved.provider.api_key_set
        assert not resolved.fell_back_to_default
        rpcs_before = _rpc_count(config, "ResolveModel")
        for _ in range(50):
            again = await client.resolve_model()
            assert again.model_config.id == model_id
        assert await client.resolve_model(model_id) is not None
        assert _rpc_count(config, "ResolveModel") == rpcs_before + 1  # only the by-id key was new
    finally:
        await client.close()


async def test_client_sees_writes_at_once_through_redis(
    config: ConfigServer,
    admin: config_service_pb2_grpc.ConfigServiceStub,
    admin_token: str,
    service_token: Callable[[str], str],
    channel_name: str,
    settings,
) -> None:
    _provider_id, model_id = await seed_provider_and_model(
        config.address, admin_token, base_url="http://127.0.0.1:9/v1", model_name="m1"
    )
    client = ConfigClient(
        config.address,
        service_token("chat"),
        redis_url=settings.redis_url,
        channel=channel_name,
        model_ttl=60,
    )
    async with client:
        assert await client.bus.wait_subscribed(10)
        assert (await client.resolve_model()).model_config.context_limit == 128_000
        assert await client.get_system_prompt()
        await admin.UpdateModelConfig(
            config_service_pb2.UpdateModelConfigRequest(
                model_config=config_pb2.ModelConfig(id=model_id, context_limit=4096),
                update_mask=field_mask_pb2.FieldMask(paths=["context_limit"]),
            )
        )
        await admin.UpdateSystemPrompt(config_service_pb2.UpdateSystemPromptRequest(text="be brief"))

        async def context_limit() -> int:
            return (await client.resolve_model()).model_config.context_limit

        # TTL is 60 s: only the Redis invalidation can make these true within the deadline.
        await wait_until(
            context_limit, until=lambda n: n == 4096, timeout=5, what="the client to see the new limit"
        )
        await wait_until(
            client.get_system_prompt,
            until=lambda text: text == "be brief",
            timeout=5,
            what="the client to see the new system prompt",
        )


async def test_client_errors_are_domain_errors_and_not_found_is_cached(
    config: ConfigServer, service_token: Callable[[str], str], admin_token: str
) -> None:
    provider_id, _ = await seed_provider_and_model(
        config.address, admin_token, base_url="http://127.0.0.1:9/v1", api_key="sk-canary-xyz"
    )
    chat = ConfigClient(config.address, service_token("chat"))
    inference = ConfigClient(config.address, service_token("inference"))
    async with chat, inference:
        with pytest.raises(PermissionDenied):
            await chat.get_provider_credentials(provider_id)
        creds = await inference.get_provider_credentials(provider_id)
        assert creds.api_key == "sk-canary-xyz"
        assert creds.provider.id == provider_id
        with pytest.raises(NotFound) as missing:
            await chat.get_workspace_template("no-such-template")
        assert missing.value.reason == "WORKSPACE_TEMPLATE_NOT_FOUND"
        before = _rpc_count(config, "GetWorkspaceTemplate")
        with pytest.raises(NotFound):
            await chat.get_workspace_template("no-such-template")
        assert _rpc_count(config, "GetWorkspaceTemplate") == before  # negative entry served from memory


async def test_client_templates_and_user_prompts(
    config: ConfigServer,
    admin: object,
    stub_for: StubFactory,
    make_token: Callable[..., str],
    service_token: Callable[[str], str],
) -> None:
    admin_stub = stub_for(make_token("root", "admin"))
    created = (
        await admin_stub.CreateWorkspaceTemplate(
            config_service_pb2.CreateWorkspaceTemplateRequest(
                workspace_template=config_pb2.WorkspaceTemplate(
                    name="python",
                    description="A Python project",
                    enabled=True,
                    source=config_pb2.TemplateSource(
                        directory=config_pb2.DirectorySource(path="/srv/python")
                    ),
                )
            )
        )
    ).workspace_template
    bob = stub_for(make_token("bob"))
    await bob.UpdateUserPrompt(config_service_pb2.UpdateUserPromptRequest(text="answer in French"))
    async with ConfigClient(config.address, service_token("chat")) as client:
        by_name = await client.get_workspace_template("python")
        by_id = await client.get_workspace_template(created.id)
        assert by_name.id == by_id.id == created.id
        assert [t.name for t in await client.list_workspace_templates()] == ["python"]
        assert await client.get_user_prompt("bob") == "answer in French"
        assert await client.get_user_prompt("carol") == ""


def _rpc_count(config: ConfigServer, method: str) -> float:
    registry = config.metrics.registry
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "agentplane_rpc_requests_total" and sample.labels.get("method") == method:
                total += sample.value
    return total
