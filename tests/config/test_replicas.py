"""Two config replicas sharing Postgres and Redis: invalidation, Redis outages, concurrent set-default."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest
from agentplane.config.v1 import config_pb2
from agentplane.config.v1 import config_service_pb2 as pb
from agentplane.config.v1.config_service_pb2_grpc import ConfigServiceStub
from prometheus_client import CollectorRegistry

from services.common.client import create_channel
from services.common.embedded import start_redis
from services.common.settings import Settings
from services.config import server as config_server
from services.config.server import ConfigServer
from services.config.service import CacheSettings
from tests.config.rpc import create_model, create_provider, mask
from tests.helpers import wait_until


async def _start_pair(
    settings: Settings, channel: str, cache: CacheSettings
) -> tuple[ConfigServer, ConfigServer]:
    a = await config_server.start(settings, channel=channel, cache=cache, registry=CollectorRegistry())
    b = await config_server.start(settings, channel=channel, cache=cache, registry=CollectorRegistry())
    return a, b


def _stub(server: ConfigServer, token: str, channels: list[object]) -> ConfigServiceStub:
    channel = create_channel(server.address, token=token)
    channels.append(channel)
    return ConfigServiceStub(channel)


async def test_write_on_one_replica_is_seen_on_the_other_before_the_ttl(
    settings: Settings, channel_name: str, admin_token: str, user_token: str
) -> None:
    a, b = await _start_pair(settings, channel_name, CacheSettings(model_ttl=30, prompt_ttl=30))
    channels: list[object] = []
    try:
        assert await a.bus.wait_subscribed(10) and await b.bus.wait_subscribed(10)
        admin_a = _stub(a, admin_token, channels)
        user_b = _stub(b, user_token, channels)
        provider = await create_provider(admin_a)
        model = await create_model(admin_a, provider.id, name="first")
        assert (await user_b.ResolveModel(pb.ResolveModelRequest())).model_config.display_name == "first"
        await user_b.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="v1"))
        assert (await user_b.GetUserPrompt(pb.GetUserPromptRequest())).user_prompt.text == "v1"

        await admin_a.UpdateModelConfig(
            pb.UpdateModelConfigRequest(
                model_config=config_pb2.ModelConfig(id=model.id, display_name="renamed"),
                update_mask=mask("display_name"),
            )
        )
        await _stub(a, user_token, channels).UpdateUserPrompt(pb.UpdateUserPromptRequest(text="v2"))

        async def model_name() -> str:
            return (await user_b.ResolveModel(pb.ResolveModelRequest())).model_config.display_name

        async def prompt() -> str:
            return (await user_b.GetUserPrompt(pb.GetUserPromptRequest())).user_prompt.text

        # The TTL is 30 s; only the Redis invalidation can make B see the writes within 3 s.
        await wait_until(model_name, until=lambda n: n == "renamed", timeout=3, what="B to see the rename")
        await wait_until(prompt, until=lambda t: t == "v2", timeout=3, what="B to see the new prompt")
    finally:
        for channel in channels:
            await channel.close()  # type: ignore[attr-defined]
        await a.stop()
        await b.stop()


async def test_with_redis_stopped_both_replicas_keep_serving(
    settings: Settings, channel_name: str, admin_token: str, user_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    redis = await asyncio.to_thread(start_redis)  # our own server, so the test can stop it
    settings = settings.replace(redis_url=redis.url)
    a, b = await _start_pair(settings, channel_name, CacheSettings(model_ttl=1.0, prompt_ttl=1.0))
    channels: list[object] = []
    try:
        assert await a.bus.wait_subscribed(10) and await b.bus.wait_subscribed(10)
        admin_a = _stub(a, admin_token, channels)
        user_b = _stub(b, user_token, channels)
        provider = await create_provider(admin_a)
        model = await create_model(admin_a, provider.id, name="first")
        assert (await user_b.ResolveModel(pb.ResolveModelRequest())).model_config.id == model.id

        caplog.set_level(logging.WARNING)
        await asyncio.to_thread(redis.stop)

        await wait_until(lambda: not b.bus.subscribed, timeout=10, what="B to notice Redis is gone")
        # Writes and reads keep working on both replicas; no caller sees an error.
        await admin_a.UpdateModelConfig(
            pb.UpdateModelConfigRequest(
                model_config=config_pb2.ModelConfig(id=model.id, display_name="during-outage"),
                update_mask=mask("display_name"),
            )
        )
        await _stub(a, user_token, channels).UpdateUserPrompt(pb.UpdateUserPromptRequest(text="offline"))
        assert (await _stub(a, user_token, channels).ResolveModel(pb.ResolveModelRequest())).model_config.id

        async def seen_by_b() -> tuple[str, str]:
            resolved = await user_b.ResolveModel(pb.ResolveModelRequest())
            prompt = await user_b.GetUserPrompt(pb.GetUserPromptRequest())
            return resolved.model_config.display_name, prompt.user_prompt.text

        await wait_until(  # the 1 s TTL is the fallback
            seen_by_b,
            until=lambda seen: seen == ("during-outage", "offline"),
            timeout=5,
            what="B to see the writes made during the outage once its cache expires",
        )
        assert any("could not publish" in r.getMessage() for r in caplog.records)
        assert any("Redis is unavailable" in r.getMessage() for r in caplog.records)

        # Redis comes back on the same port: both replicas resubscribe on their own.
        redis = await asyncio.to_thread(start_redis, port=redis.port)
        assert await a.bus.wait_subscribed(15) and await b.bus.wait_subscribed(15)
        published = a.metrics.invalidations_published._value.get()
        await admin_a.UpdateSystemPrompt(pb.UpdateSystemPromptRequest(text="back"))
        assert a.metrics.invalidations_published._value.get() == published + 1
    finally:
        for channel in channels:
            await channel.close()  # type: ignore[attr-defined]
        await a.stop()
        await b.stop()
        await asyncio.to_thread(redis.stop)


async def test_concurrent_set_default_leaves_exactly_one_default(
    settings: Settings, channel_name: str, admin_token: str, database_url: str
) -> None:
    a, b = await _start_pair(settings, channel_name, CacheSettings())
    channels: list[object] = []
    try:
        stubs = [_stub(a, admin_token, channels), _stub(b, admin_token, channels)]
        provider = await create_provider(stubs[0])
        models = [await create_model(stubs[0], provider.id, name=f"m{i}") for i in range(6)]
        calls = [
            stubs[i % 2].SetDefaultModelConfig(
                pb.SetDefaultModelConfigRequest(model_config_id=models[i % 6].id)
            )
            for i in range(30)
        ]
        results = await asyncio.gather(*calls)
        assert all(r.model_config.is_default for r in results)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute("SELECT id::text FROM config_model_configs WHERE is_default")
            defaults = [row[0] for row in await cur.fetchall()]
        assert len(defaults) == 1
        assert defaults[0] in {m.id for m in models}
        for stub in stubs:

            async def default_id(stub: ConfigServiceStub = stub) -> str:
                return (await stub.ResolveModel(pb.ResolveModelRequest())).model_config.id

            await wait_until(
                default_id,
                until=lambda got: got == defaults[0],
                timeout=3,
                what="every replica to resolve the one default model",
            )
    finally:
        for channel in channels:
            await channel.close()  # type: ignore[attr-defined]
        await a.stop()
        await b.stop()
