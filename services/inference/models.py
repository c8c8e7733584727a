"""ListProviderModels: the models a provider offers, through its SDK."""

from __future__ import annotations

from agentplane.config.v1 import config_pb2
from agentplane.inference.v1 import inference_pb2

from services.common.errors import NotFound
from services.inference import classify
from services.inference.clients import ProviderClients
from services.inference.generate import Target
from services.inference.resolver import ModelResolver


async def list_provider_models(
    resolver: ModelResolver, clients: ProviderClients, provider_id: str
) -> list[inference_pb2.ProviderModel]:
    """Every model the provider lists (the SDKs page through the provider's own pagination)."""
    creds = await resolver.get_provider_credentials(provider_id)
    if not creds.HasField("provider"):
        raise NotFound(f"provider {provider_id} not found", reason="PROVIDER_NOT_FOUND")
    client = clients.get(creds.provider, creds.api_key)
    target_name = Target(
        model=config_pb2.ModelConfig(), provider=creds.provider, api_key=creds.api_key
    ).description
    models: list[inference_pb2.ProviderModel] = []
    try:
        async for item in client.models.list():
            models.append(
                inference_pb2.ProviderModel(
                    id=item.id, display_name=getattr(item, "display_name", None) or ""
                )
            )
    except Exception as exc:
        failure = classify.classify(exc)
        raise classify.to_domain_error(
            failure,
            provider=target_name,
            model="(listing models)",
            attempts=1,
            output_started=False,
            secret=creds.api_key,
        ) from None
    return models
