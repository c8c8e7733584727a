"""`ConfigClient`: the cached ConfigService client that chat, inference and toolexec use.

It has the service's cache semantics on the caller's side (TTLs, single-flight, negative
caching of NOT_FOUND, a generation counter) and listens to the same Redis invalidation channel
as the config replicas, so a write is seen at once and, in the steady state, a chat step makes
no config RPC at all. With Redis down (or no `redis_url`) entries simply expire after their TTL.

Errors come back as the kit's domain errors (`services.common.errors`: NotFound,
PermissionDenied, FailedPrecondition, Unavailable, ...), decoded from the status and its
ErrorInfo, so callers never handle raw grpc errors. Returned messages are shared with the
cache: treat them as read-only (copy before mutating).

Typical use::

    client = ConfigClient(settings.address("config"), ServiceTokenProvider(settings.keys, "chat"),
                          redis_url=settings.redis_url)
    await client.start()
    resolved = await client.resolve_model(chat.model_config_id)
    ...
    await client.close()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common.client import create_channel
from services.common.errors import NotFound
from services.common.rpc_errors import from_rpc_error
from services.config import invalidation as inv
from services.config.cache import AsyncTTLCache
from services.config.invalidation import DEFAULT_CHANNEL, Invalidation, InvalidationBus
from services.config.metrics import ConfigMetrics

T = TypeVar("T")


class ConfigClient:
    """Cached ConfigService client with the service's cache semantics (TTL, single-flight, negative
    caching, generation counter, Redis invalidation), so a chat step makes no config RPC in steady state."""

    def __init__(
        self,
        address: str,
        token: str | Callable[[], str],
        *,
        redis_url: str | None = None,
        model_ttl: float = 10.0,
        prompt_ttl: float = 5.0,
        channel: str = DEFAULT_CHANNEL,
        registry: CollectorRegistry | None = None,
        rpc_timeout: float = 10.0,
    ) -> None:
        """`token` is a service token (``mint_service_token(secret, "chat")``) or, for long-running
        processes, a provider such as ``auth.ServiceTokenProvider(secret, "chat")`` that re-mints it."""
        self._address = address
        self._token = token
        self._timeout = rpc_timeout
        m = ConfigMetrics.for_registry(registry)
        self._channel: grpc.aio.Channel | None = None
        self._stub: config_service_pb2_grpc.ConfigServiceStub | None = None
        self._resolve: AsyncTTLCache[str, config_service_pb2.ResolveModelResponse] = AsyncTTLCache(
            "client_resolve", model_ttl, counters=m.cache_counters("client_resolve")
        )
        self._credentials: AsyncTTLCache[str, config_service_pb2.GetProviderCredentialsResponse] = (
            AsyncTTLCache(
                "client_credentials",
                model_ttl,
                negative_errors=(NotFound,),
                counters=m.cache_counters("client_credentials"),
            )
        )
        self._system_prompt: AsyncTTLCache[str, str] = AsyncTTLCache(
            "client_system_prompt", model_ttl, counters=m.cache_counters("client_system_prompt")
        )
        self._user_prompts: AsyncTTLCache[str, str] = AsyncTTLCache(
            "client_user_prompt", prompt_ttl, counters=m.cache_counters("client_user_prompt")
        )
        self._templates: AsyncTTLCache[str, config_pb2.WorkspaceTemplate] = AsyncTTLCache(
            "client_template",
            model_ttl,
            negative_errors=(NotFound,),
            counters=m.cache_counters("client_template"),
        )
        self._template_list: AsyncTTLCache[str, list[config_pb2.WorkspaceTemplate]] = AsyncTTLCache(
            "client_template_list", model_ttl, counters=m.cache_counters("client_template_list")
        )
        self.bus = InvalidationBus(
            redis_url, self.apply_invalidation, channel=channel, metrics=m, name="config-client"
        )

    async def start(self) -> None:
        """Open the channel and subscribe to invalidations (returns at once even when Redis is down)."""
        if self._channel is None:
            if isinstance(self._token, str):
                self._channel = create_channel(self._address, token=self._token)
            else:
                self._channel = create_channel(self._address, token_provider=self._token)
            self._stub = config_service_pb2_grpc.ConfigServiceStub(self._channel)
        await self.bus.start()

    async def close(self) -> None:
        """Stop listening and close the channel."""
        await self.bus.close()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> ConfigClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- invalidation ----------------------------------------------------------------

    def apply_invalidation(self, message: Invalidation) -> None:
        """Drop the entries `message` affects (called for every Redis invalidation)."""
        kind, key = message.kind, message.key
        if kind in (inv.PROVIDER, inv.MODEL, inv.DEFAULT_MODEL, inv.ALL):
            # A resolution combines a model, the default and a provider: any of them may change it.
            self._resolve.invalidate_all()
        if kind == inv.PROVIDER and key:
            self._credentials.invalidate(key)
        elif kind in (inv.PROVIDER, inv.ALL):
            self._credentials.invalidate_all()
        if kind in (inv.TEMPLATE, inv.ALL):
            self._templates.invalidate_all()
            self._template_list.invalidate_all()
        if kind in (inv.SYSTEM_PROMPT, inv.ALL):
            self._system_prompt.invalidate_all()
        if kind == inv.USER_PROMPT and key:
            self._user_prompts.invalidate(key)
        elif kind in (inv.USER_PROMPT, inv.ALL):
            self._user_prompts.invalidate_all()

    def invalidate_all(self) -> None:
        """Drop every cached entry (for example after this process wrote config itself)."""
        self.apply_invalidation(Invalidation(inv.ALL))

    # --- calls -----------------------------------------------------------------------

    async def _call(self, method: str, request: Any) -> Any:
        if self._stub is None:
            raise RuntimeError("ConfigClient.start() must be awaited before use")
        try:
            return await getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def resolve_model(self, model_config_id: str = "") -> config_service_pb2.ResolveModelResponse:
        """The model config (the default for "") and its provider, without secrets; a disabled or
        deleted model resolves to the default with ``fell_back_to_default`` set."""

        async def load() -> config_service_pb2.ResolveModelResponse:
            request = config_service_pb2.ResolveModelRequest(model_config_id=model_config_id)
            response: config_service_pb2.ResolveModelResponse = await self._call("ResolveModel", request)
            return response

        return await self._resolve.get(model_config_id, load)

    async def get_provider_credentials(
        self, provider_id: str
    ) -> config_service_pb2.GetProviderCredentialsResponse:
        """The provider and its decrypted API key. Only works with the inference service's token;
        kept in this process's memory only and invalidated like providers."""

        async def load() -> config_service_pb2.GetProviderCredentialsResponse:
            request = config_service_pb2.GetProviderCredentialsRequest(provider_id=provider_id)
            response: config_service_pb2.GetProviderCredentialsResponse = await self._call(
                "GetProviderCredentials", request
            )
            return response

        return await self._credentials.get(provider_id, load)

    async def get_system_prompt(self) -> str:
        """The deployment system prompt (the built-in default when none is set)."""

        async def load() -> str:
            response = await self._call("GetSystemPrompt", config_service_pb2.GetSystemPromptRequest())
            return str(response.system_prompt.text)

        return await self._system_prompt.get("", load)

    async def get_user_prompt(self, user_id: str) -> str:
        """`user_id`'s own prompt ("" when none); needs a service token (or that user's own)."""

        async def load() -> str:
            response = await self._call(
                "GetUserPrompt", config_service_pb2.GetUserPromptRequest(user_id=user_id)
            )
            return str(response.user_prompt.text)

        return await self._user_prompts.get(user_id, load)

    async def get_workspace_template(self, template_id_or_name: str) -> config_pb2.WorkspaceTemplate:
        """An enabled workspace template by id or name; NotFound when missing or disabled."""

        async def load() -> config_pb2.WorkspaceTemplate:
            request = config_service_pb2.GetWorkspaceTemplateRequest(
                workspace_template_id=template_id_or_name
            )
            response = await self._call("GetWorkspaceTemplate", request)
            template: config_pb2.WorkspaceTemplate = response.workspace_template
            if not template.enabled:
                raise NotFound(
                    f"workspace template {template_id_or_name} not found",
                    reason="WORKSPACE_TEMPLATE_NOT_FOUND",
                    metadata={"workspace_template_id": template_id_or_name},
                )
            return template

        return await self._templates.get(template_id_or_name, load)

    async def list_workspace_templates(self) -> list[config_pb2.WorkspaceTemplate]:
        """Every enabled workspace template, by name (all pages)."""

        async def load() -> list[config_pb2.WorkspaceTemplate]:
            templates: list[config_pb2.WorkspaceTemplate] = []
            token = ""
            while True:
                request = config_service_pb2.ListWorkspaceTemplatesRequest(page_size=500, page_token=token)
                response = await self._call("ListWorkspaceTemplates", request)
                templates.extend(response.workspace_templates)
                token = response.next_page_token
                if not token:
                    return templates

        return list(await self._template_list.get("", load))
