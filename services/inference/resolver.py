"""The model resolver: where Generate gets the model config, its provider and the provider's key.

The domain code depends only on this protocol; the server wires in the config service's
cached client (`services.config.client.ConfigClient` has exactly these two methods).
"""

from __future__ import annotations

from typing import Protocol

from agentplane.config.v1 import config_service_pb2


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
