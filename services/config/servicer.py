"""The gRPC servicer: thin wrappers that call `ConfigService` and build the response messages."""

from __future__ import annotations

from typing import Any

from agentplane.config.v1 import config_service_pb2 as pb
from agentplane.config.v1 import config_service_pb2_grpc

from services.config.service import ConfigService

Context = Any  # grpc.aio.ServicerContext; errors are raised as domain errors, never via the context


class ConfigServicer(config_service_pb2_grpc.ConfigServiceServicer):
    """agentplane.config.v1.ConfigService."""

    def __init__(self, service: ConfigService) -> None:
        self._svc = service

    async def CreateProvider(
        self, request: pb.CreateProviderRequest, context: Context
    ) -> pb.CreateProviderResponse:
        return pb.CreateProviderResponse(provider=await self._svc.create_provider(request))

    async def GetProvider(self, request: pb.GetProviderRequest, context: Context) -> pb.GetProviderResponse:
        return pb.GetProviderResponse(provider=await self._svc.get_provider(request.provider_id))

    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: Context
    ) -> pb.ListProvidersResponse:
        providers, token = await self._svc.list_providers(request.page_size, request.page_token)
        return pb.ListProvidersResponse(providers=providers, next_page_token=token)

    async def UpdateProvider(
        self, request: pb.UpdateProviderRequest, context: Context
    ) -> pb.UpdateProviderResponse:
        return pb.UpdateProviderResponse(provider=await self._svc.update_provider(request))

    async def DeleteProvider(
        self, request: pb.DeleteProviderRequest, context: Context
    ) -> pb.DeleteProviderResponse:
        await self._svc.delete_provider(request.provider_id, request.etag)
        return pb.DeleteProviderResponse()

    async def GetProviderCredentials(
        self, request: pb.GetProviderCredentialsRequest, context: Context
    ) -> pb.GetProviderCredentialsResponse:
        return await self._svc.get_provider_credentials(request.provider_id)

    async def RotateEncryptionKey(
        self, request: pb.RotateEncryptionKeyRequest, context: Context
    ) -> pb.RotateEncryptionKeyResponse:
        return await self._svc.rotate_encryption_key(request)

    async def CreateModelConfig(
        self, request: pb.CreateModelConfigRequest, context: Context
    ) -> pb.CreateModelConfigResponse:
        return pb.CreateModelConfigResponse(model_config=await self._svc.create_model_config(request))

    async def GetModelConfig(
        self, request: pb.GetModelConfigRequest, context: Context
    ) -> pb.GetModelConfigResponse:
        return pb.GetModelConfigResponse(
            model_config=await self._svc.get_model_config(request.model_config_id)
        )

    async def ListModelConfigs(
        self, request: pb.ListModelConfigsRequest, context: Context
    ) -> pb.ListModelConfigsResponse:
        models, token = await self._svc.list_model_configs(request)
        return pb.ListModelConfigsResponse(model_configs=models, next_page_token=token)

    async def UpdateModelConfig(
        self, request: pb.UpdateModelConfigRequest, context: Context
    ) -> pb.UpdateModelConfigResponse:
        return pb.UpdateModelConfigResponse(model_config=await self._svc.update_model_config(request))

    async def DeleteModelConfig(
        self, request: pb.DeleteModelConfigRequest, context: Context
    ) -> pb.DeleteModelConfigResponse:
        await self._svc.delete_model_config(request.model_config_id, request.etag)
        return pb.DeleteModelConfigResponse()

    async def SetDefaultModelConfig(
        self, request: pb.SetDefaultModelConfigRequest, context: Context
    ) -> pb.SetDefaultModelConfigResponse:
        return pb.SetDefaultModelConfigResponse(
            model_config=await self._svc.set_default_model_config(request.model_config_id)
        )

    async def ResolveModel(
        self, request: pb.ResolveModelRequest, context: Context
    ) -> pb.ResolveModelResponse:
        return await self._svc.resolve_model(request.model_config_id)

    async def CreateWorkspaceTemplate(
        self, request: pb.CreateWorkspaceTemplateRequest, context: Context
    ) -> pb.CreateWorkspaceTemplateResponse:
        return pb.CreateWorkspaceTemplateResponse(
            workspace_template=await self._svc.create_workspace_template(request)
        )

    async def GetWorkspaceTemplate(
        self, request: pb.GetWorkspaceTemplateRequest, context: Context
    ) -> pb.GetWorkspaceTemplateResponse:
        return pb.GetWorkspaceTemplateResponse(
            workspace_template=await self._svc.get_workspace_template(request.workspace_template_id)
        )

    async def ListWorkspaceTemplates(
        self, request: pb.ListWorkspaceTemplatesRequest, context: Context
    ) -> pb.ListWorkspaceTemplatesResponse:
        templates, token = await self._svc.list_workspace_templates(request)
        return pb.ListWorkspaceTemplatesResponse(workspace_templates=templates, next_page_token=token)

    async def UpdateWorkspaceTemplate(
        self, request: pb.UpdateWorkspaceTemplateRequest, context: Context
    ) -> pb.UpdateWorkspaceTemplateResponse:
        return pb.UpdateWorkspaceTemplateResponse(
            workspace_template=await self._svc.update_workspace_template(request)
        )

    async def DeleteWorkspaceTemplate(
        self, request: pb.DeleteWorkspaceTemplateRequest, context: Context
    ) -> pb.DeleteWorkspaceTemplateResponse:
        await self._svc.delete_workspace_template(request.workspace_template_id, request.etag)
        return pb.DeleteWorkspaceTemplateResponse()

    async def GetSystemPrompt(
        self, request: pb.GetSystemPromptRequest, context: Context
    ) -> pb.GetSystemPromptResponse:
        return pb.GetSystemPromptResponse(system_prompt=await self._svc.get_system_prompt())

    async def UpdateSystemPrompt(
        self, request: pb.UpdateSystemPromptRequest, context: Context
    ) -> pb.UpdateSystemPromptResponse:
        return pb.UpdateSystemPromptResponse(
            system_prompt=await self._svc.update_system_prompt(request.text, request.etag)
        )

    async def GetUserPrompt(
        self, request: pb.GetUserPromptRequest, context: Context
    ) -> pb.GetUserPromptResponse:
        return pb.GetUserPromptResponse(user_prompt=await self._svc.get_user_prompt(request.user_id))

    async def UpdateUserPrompt(
        self, request: pb.UpdateUserPromptRequest, context: Context
    ) -> pb.UpdateUserPromptResponse:
        return pb.UpdateUserPromptResponse(
            user_prompt=await self._svc.update_user_prompt(request.text, request.etag)
        )
