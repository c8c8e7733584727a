"""Helpers for other services' tests: seed config through the real RPCs.

    from services.config import server as config_server
    from services.config.testing import seed_provider_and_model

    config = await config_server.start(settings)            # a real config server on port 0
    provider_id, model_id = await seed_provider_and_model(
        config.address, admin_token,
        provider_type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
        base_url=simulator_url, api_key="sk-test", model_name="sim-model",
    )
    ...
    await config.stop()

The first enabled model of a deployment becomes its default, so `ResolveModel("")` then
returns this model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from google.protobuf import json_format

from services.common.client import create_channel
from services.common.rpc_errors import from_rpc_error


async def seed_provider_and_model(
    address: str,
    admin_token: str,
    *,
    provider_type: int | str = config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
    base_url: str = "",
    api_key: str = "",
    model_name: str = "test-model",
    pricing: config_pb2.ModelPricing | Mapping[str, int] | None = None,
    options: config_pb2.ModelOptions | Mapping[str, Any] | None = None,
    context_limit: int = 128_000,
    compaction_threshold_percent: int = 80,
    max_output_tokens: int = 0,
    make_default: bool = True,
) -> tuple[str, str]:
    """Create an enabled provider and an enabled model config on it; returns (provider_id, model_config_id).

    `provider_type` is a `ProviderType` value or name (``"PROVIDER_TYPE_ANTHROPIC"``); `pricing`
    and `options` are protos or dicts in proto JSON form (``{"temperature": 0.2}``). With
    `make_default` the model becomes the deployment's default. Errors are raised as domain errors.
    """
    if isinstance(provider_type, str):
        provider_type = config_pb2.ProviderType.Value(provider_type)
    model = config_pb2.ModelConfig(
        model_name=model_name,
        display_name=model_name,
        enabled=True,
        is_default=make_default,
        context_limit=context_limit,
        compaction_threshold_percent=compaction_threshold_percent,
        max_output_tokens=max_output_tokens,
    )
    if pricing is not None:
        if isinstance(pricing, config_pb2.ModelPricing):
            model.pricing.CopyFrom(pricing)
        else:
            json_format.ParseDict(dict(pricing), model.pricing)
    if options is not None:
        if isinstance(options, config_pb2.ModelOptions):
            model.options.CopyFrom(options)
        else:
            json_format.ParseDict(dict(options), model.options)
    channel = create_channel(address, token=admin_token)
    try:
        stub = config_service_pb2_grpc.ConfigServiceStub(channel)
        provider = (
            await stub.CreateProvider(
                config_service_pb2.CreateProviderRequest(
                    provider=config_pb2.Provider(
                        type=provider_type,  # type: ignore[arg-type]
                        display_name=f"{model_name} provider",
                        base_url=base_url,
                        enabled=True,
                    ),
                    api_key=api_key,
                )
            )
        ).provider
        model.provider_id = provider.id
        created = (
            await stub.CreateModelConfig(config_service_pb2.CreateModelConfigRequest(model_config=model))
        ).model_config
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    finally:
        await channel.close()
    return provider.id, created.id
