"""Small helpers for calling ConfigService in tests."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import grpc.aio
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from google.protobuf import field_mask_pb2

from services.common.rpc_errors import error_info


async def expect_error(call: Awaitable[object], code: grpc.StatusCode) -> tuple[str, str, dict[str, str]]:
    """Await `call`, which must fail with `code`; returns (message, reason, metadata)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {exc.details()}"
        info = error_info(exc)
        reason, metadata = info if info else ("", {})
        return exc.details() or "", reason, metadata
    raise AssertionError(f"expected {code.name}, but the call succeeded")


async def create_provider(
    stub: config_service_pb2_grpc.ConfigServiceStub,
    *,
    api_key: str = "sk-test-key",
    base_url: str = "http://127.0.0.1:9/v1",
    provider_type: config_pb2.ProviderType.ValueType = config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
    enabled: bool = True,
    name: str = "sim",
) -> config_pb2.Provider:
    """Create a provider and return it."""
    response = await stub.CreateProvider(
        config_service_pb2.CreateProviderRequest(
            provider=config_pb2.Provider(
                type=provider_type, display_name=name, base_url=base_url, enabled=enabled
            ),
            api_key=api_key,
        )
    )
    return response.provider


async def create_model(
    stub: config_service_pb2_grpc.ConfigServiceStub,
    provider_id: str,
    *,
    name: str = "model",
    enabled: bool = True,
    is_default: bool = False,
    context_limit: int = 100_000,
) -> config_pb2.ModelConfig:
    """Create a model config and return it."""
    response = await stub.CreateModelConfig(
        config_service_pb2.CreateModelConfigRequest(
            model_config=config_pb2.ModelConfig(
                provider_id=provider_id,
                model_name=name,
                display_name=name,
                enabled=enabled,
                is_default=is_default,
                context_limit=context_limit,
                compaction_threshold_percent=80,
            )
        )
    )
    return response.model_config


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    """A FieldMask of `paths`."""
    return field_mask_pb2.FieldMask(paths=list(paths))
