"""The model resolver: where Generate gets the model config, its provider and the provider's key.

The domain code depends only on this protocol; the server wires in the config service's
cached client (`services.config.client.ConfigClient` has exactly these two methods).
"""

from __future__ import annotations

from typing import Protocol

from agentplane.config.v1 import config_pb2, config_service_pb2


class ModelResolver(Protocol):
    """Looks up model configs and provider credentials (cached by the implementation)."""

    async def resolve_model(self, model_config_id: str = "") -> config_service_pb2.ResolveModelResponse:
        """The model config (the default for "") and its provider, without secrets."""
        ...

    async def get_provider_credentials(
        self, provider_id: str
    ) -> config_service_pb2.GetProviderCredentialsResponse:
        """The provider and its decrypted API key."""
        ...


class StaticModelResolver:
    """A fixed model and provider held in memory (benchmarks, and running inference without config)."""

    def __init__(self, model: config_pb2.ModelConfig, provider: config_pb2.Provider, api_key: str) -> None:
        self._resolved = config_service_pb2.ResolveModelResponse(model_config=model, provider=provider)
        self._credentials = config_service_pb2.GetProviderCredentialsResponse(
            provider=provider, api_key=api_key
        )

    async def resolve_model(self, model_config_id: str = "") -> config_service_pb2.ResolveModelResponse:
        """The one model, whatever id is asked for."""
        return self._resolved

    async def get_provider_credentials(
        self, provider_id: str
    ) -> config_service_pb2.GetProviderCredentialsResponse:
        """The one provider's credentials."""
        return self._credentials
