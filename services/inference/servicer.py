"""The InferenceService servicer: authorize, validate, call the domain code, return protos."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from agentplane.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

from services.common import auth
from services.common.errors import PermissionDenied
from services.inference.generate import Generator
from services.inference.models import list_provider_models
from services.inference.validation import validate_generate, validate_list_models


def require_service_or_admin(action: str) -> auth.Identity:
    """Only services (the chat service, on a user's behalf) and admins may call the inference service."""
    identity = auth.current_identity()
    if not (identity.is_service() or identity.is_admin):
        raise PermissionDenied(
            f"{action} is only for services and admins; users reach models through the chat service",
            reason="SERVICE_OR_ADMIN_REQUIRED",
        )
    return identity


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """Thin gRPC layer over `Generator`."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    async def Generate(
        self, request: inference_service_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        """Stream one generation."""
        require_service_or_admin("Generate")
        validate_generate(request)
        async for event in self.generator.generate(request):
            yield event

    async def ListProviderModels(
        self, request: inference_service_pb2.ListProviderModelsRequest, context: Any
    ) -> inference_service_pb2.ListProviderModelsResponse:
        """List a provider's models, paginated."""
        require_service_or_admin("ListProviderModels")
        offset, size = validate_list_models(request)
        models = await list_provider_models(
            self.generator.resolver, self.generator.clients, request.provider_id
        )
        page = models[offset : offset + size]
        next_token = f"o{offset + size}" if offset + size < len(models) else ""
        return inference_service_pb2.ListProviderModelsResponse(models=page, next_page_token=next_token)
