"""The config service's domain logic: roles, caching, invalidation, encryption. No grpc.

The servicer validates requests (`validation`), calls a method here and wraps the result in
the response message. Reads go through TTL caches (see `cache`); every write drops the
affected entries locally and publishes an invalidation so other replicas and clients drop
theirs (see `invalidation`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentplane.config.v1 import config_pb2, config_service_pb2

from services.common import auth, logs
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.common.settings import env_seconds
from services.config import invalidation as inv
from services.config import pagination, records, validation
from services.config.cache import AsyncTTLCache
from services.config.crypto import KeyRing, SealedKey
from services.config.invalidation import Invalidation, InvalidationBus
from services.config.metrics import ConfigMetrics
from services.config.prompts import DEFAULT_SYSTEM_PROMPT, user_prompt_owner
from services.config.store import ConfigStore, model_not_found, provider_not_found

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSettings:
    """TTLs of the service's caches (seconds)."""

    model_ttl: float = 10.0
    prompt_ttl: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CacheSettings:
        """``AGENTPLANE_CONFIG_CACHE_TTL_SECONDS`` (providers, models, templates, system prompt; default 10)
        and ``AGENTPLANE_CONFIG_PROMPT_CACHE_TTL_SECONDS`` (user prompts; default 5)."""
        env = os.environ if environ is None else environ
        return cls(
            model_ttl=env_seconds(env, "AGENTPLANE_CONFIG_CACHE_TTL_SECONDS", 10.0),
            prompt_ttl=env_seconds(env, "AGENTPLANE_CONFIG_PROMPT_CACHE_TTL_SECONDS", 5.0),
        )


@dataclass(frozen=True)
class ProviderRecord:
    """A provider as cached: the proto (no key) and the sealed key, if any."""

    provider: config_pb2.Provider
    sealed: SealedKey | None


def _provider_record(row: dict[str, Any]) -> ProviderRecord:
    sealed = (
        SealedKey(row["api_key_key_id"], bytes(row["api_key_ciphertext"]))
        if row["api_key_ciphertext"] is not None
        else None
    )
    return ProviderRecord(records.provider_from_row(row), sealed)


def _require_admin_or_service() -> auth.Identity:
    identity = auth.current_identity()
    if not (identity.is_admin or identity.is_service()):
        raise PermissionDenied(
            "this call requires the admin role or a service identity", reason="ADMIN_REQUIRED"
        )
    return identity


def _sees_disabled() -> bool:
    # A service acting for a user sees what that user sees: the chat service answering bob must not
    # show him a disabled model's name. Bare services (background reads) see everything.
    identity = auth.current_identity()
    return identity.is_admin or (identity.is_service() and identity.acting_for is None)


class ConfigService:
    """Providers, model configs, prompts and templates, cached and invalidated across replicas."""

    def __init__(
        self,
        store: ConfigStore,
        keyring: KeyRing,
        *,
        cache: CacheSettings | None = None,
        metrics: ConfigMetrics | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        cache = cache or CacheSettings()
        m = metrics or ConfigMetrics.for_registry()
        self.bus: InvalidationBus | None = None
        self.providers: AsyncTTLCache[str, ProviderRecord | None] = AsyncTTLCache(
            "provider", cache.model_ttl, counters=m.cache_counters("provider")
        )
        self.models: AsyncTTLCache[str, config_pb2.ModelConfig | None] = AsyncTTLCache(
            "model", cache.model_ttl, counters=m.cache_counters("model")
        )
        self.default_model: AsyncTTLCache[str, config_pb2.ModelConfig | None] = AsyncTTLCache(
            "default_model", cache.model_ttl, counters=m.cache_counters("default_model")
        )
        self.templates: AsyncTTLCache[str, config_pb2.WorkspaceTemplate | None] = AsyncTTLCache(
            "template", cache.model_ttl, counters=m.cache_counters("template")
        )
        self.system_prompt: AsyncTTLCache[str, config_pb2.SystemPrompt] = AsyncTTLCache(
            "system_prompt", cache.model_ttl, counters=m.cache_counters("system_prompt")
        )
        self.user_prompts: AsyncTTLCache[str, config_pb2.UserPrompt] = AsyncTTLCache(
            "user_prompt", cache.prompt_ttl, counters=m.cache_counters("user_prompt")
        )

    # --- invalidation ----------------------------------------------------------------

    def apply_invalidation(self, message: Invalidation) -> None:
        """Drop the cache entries `message` names (local writes and other replicas' writes)."""
        kind, key = message.kind, message.key
        if kind in (inv.PROVIDER, inv.ALL):
            self._drop(self.providers, key if kind == inv.PROVIDER else "")
        if kind in (inv.MODEL, inv.DEFAULT_MODEL, inv.ALL):
            self._drop(self.models, key if kind == inv.MODEL else "")
            # The default entry holds a copy of a model, so any model change may affect it.
            self.default_model.invalidate_all()
        if kind in (inv.TEMPLATE, inv.ALL):
            self.templates.invalidate_all()  # keyed by id and by name; templates are few
        if kind in (inv.SYSTEM_PROMPT, inv.ALL):
            self.system_prompt.invalidate_all()
        if kind in (inv.USER_PROMPT, inv.ALL):
            self._drop(self.user_prompts, key if kind == inv.USER_PROMPT else "")

    @staticmethod
    def _drop(cache: AsyncTTLCache[str, Any], key: str) -> None:
        if key:
            cache.invalidate(key)
        else:
            cache.invalidate_all()

    async def _changed(self, *messages: Invalidation) -> None:
        # Called after the transaction committed: drop locally at once, then tell everyone else.
        for message in messages:
            self.apply_invalidation(message)
        if self.bus is not None:
            for message in messages:
                await self.bus.publish(message)

    # --- cached lookups --------------------------------------------------------------

    async def _provider(self, provider_id: str) -> ProviderRecord | None:
        async def load() -> ProviderRecord | None:
            row = await self._store.get_provider(provider_id)
            return _provider_record(row) if row else None

        return await self.providers.get(provider_id, load)

    async def _model(self, model_id: str) -> config_pb2.ModelConfig | None:
        async def load() -> config_pb2.ModelConfig | None:
            row = await self._store.get_model(model_id)
            return records.model_from_row(row) if row else None

        return await self.models.get(model_id, load)

    async def _default(self) -> config_pb2.ModelConfig | None:
        async def load() -> config_pb2.ModelConfig | None:
            row = await self._store.get_default_model()
            return records.model_from_row(row) if row else None

        return await self.default_model.get("", load)

    # --- providers -------------------------------------------------------------------

    async def create_provider(self, req: config_service_pb2.CreateProviderRequest) -> config_pb2.Provider:
        """CreateProvider (admin)."""
        auth.require_admin()
        request_id = validation.request_id(req.request_id)
        values = validation.create_provider(req)
        key = values.pop("api_key")
        provider_id = str(uuid.uuid4())
        logs.register_secret(key)
        sealed = self._keyring.seal(key, provider_id) if key else None
        row = await self._store.insert_provider(
            provider_id, request_id, values["type"], values["display_name"], values["base_url"], sealed,
            values["enabled"],
        )  # fmt: skip
        await self._changed(Invalidation(inv.PROVIDER, str(row["id"])))
        return records.provider_from_row(row)

    async def get_provider(self, provider_id: str) -> config_pb2.Provider:
        """GetProvider (admin or service)."""
        _require_admin_or_service()
        provider_id = validation.uuid_field("provider_id", provider_id)
        record = await self._provider(provider_id)
        if record is None:
            raise provider_not_found(provider_id)
        return record.provider

    async def list_providers(self, page_size: int, page_token: str) -> tuple[list[config_pb2.Provider], str]:
        """ListProviders (admin or service)."""
        _require_admin_or_service()
        size = pagination.page_size(page_size)
        after = pagination.decode_token("providers", page_token, pagination.TIME_AND_ID)
        rows = await self._store.list_providers(after, size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode_token(
                "providers", [rows[-1]["create_time"].isoformat(), str(rows[-1]["id"])]
            )
        return [records.provider_from_row(r) for r in rows], token

    async def update_provider(self, req: config_service_pb2.UpdateProviderRequest) -> config_pb2.Provider:
        """UpdateProvider (admin)."""
        auth.require_admin()
        provider_id = validation.uuid_field("provider.id", req.provider.id)
        validation.update_paths(req.update_mask, validation.PROVIDER_UPDATE_PATHS)  # before any lookup
        current = await self._store.get_provider(provider_id)
        if current is None:
            raise provider_not_found(provider_id)
        current_type = records.provider_from_row(current).type
        _, changes = validation.update_provider(req, current_type)
        if "api_key" in changes:
            key = changes.pop("api_key")
            logs.register_secret(key)
            sealed = self._keyring.seal(key, provider_id) if key else None
            changes["api_key_ciphertext"] = sealed.ciphertext if sealed else None
            changes["api_key_key_id"] = sealed.key_id if sealed else None
        # A new base_url without a new key drops the stored key (decided by the store under the row
        # lock): otherwise an admin could point the provider at their own server and receive the key.
        etag = validation.etag("provider.etag", req.provider.etag)
        row = await self._store.update_provider(provider_id, changes, etag)
        await self._changed(Invalidation(inv.PROVIDER, provider_id))
        dropped = current["api_key_ciphertext"] is not None and row["api_key_ciphertext"] is None
        if dropped and "api_key_ciphertext" not in changes:
            log.info(
                "provider base_url changed without a new API key; the stored key was dropped",
                extra={"provider_id": provider_id},
            )
        return records.provider_from_row(row)

    async def rotate_encryption_key(
        self, req: config_service_pb2.RotateEncryptionKeyRequest
    ) -> config_service_pb2.RotateEncryptionKeyResponse:
        """RotateEncryptionKey (admin): re-seal every stored key with the primary key, all or nothing."""
        auth.require_admin()

        def reseal(provider_id: str, sealed: SealedKey) -> SealedKey | None:
            try:
                return self._keyring.reseal(sealed, provider_id)
            except FailedPrecondition as exc:
                raise FailedPrecondition(
                    f"provider {provider_id}: {exc}; nothing was re-encrypted. Add the key it was "
                    "encrypted with to AGENTPLANE_ENCRYPTION_KEY (after the new one), or set that "
                    "provider's API key again, then retry",
                    reason=exc.reason,
                    metadata={**exc.metadata, "provider_id": provider_id},
                ) from None

        changed, current = await self._store.reseal_provider_keys(reseal, write=not req.validate_only)
        if changed and not req.validate_only:
            await self._changed(Invalidation(inv.PROVIDER))
        log.info(
            "encryption key rotation%s: %d re-encrypted, %d already current",
            " (validate only)" if req.validate_only else "",
            len(changed),
            current,
            extra={"key_id": self._keyring.primary_key_id},
        )
        return config_service_pb2.RotateEncryptionKeyResponse(
            key_id=self._keyring.primary_key_id,
            reencrypted_provider_ids=changed,
            already_current_count=current,
        )

    async def delete_provider(self, provider_id: str, etag: str = "") -> None:
        """DeleteProvider (admin); FailedPrecondition while model configs use it. Idempotent: a
        provider that is gone is deleted already."""
        auth.require_admin()
        provider_id = validation.uuid_field("provider_id", provider_id)
        if await self._store.delete_provider(provider_id, validation.etag("etag", etag)):
            await self._changed(Invalidation(inv.PROVIDER, provider_id))

    async def get_provider_credentials(
        self, provider_id: str
    ) -> config_service_pb2.GetProviderCredentialsResponse:
        """GetProviderCredentials (the inference service only)."""
        auth.require_service("inference")
        provider_id = validation.uuid_field("provider_id", provider_id)
        record = await self._provider(provider_id)
        if record is None:
            raise provider_not_found(provider_id)
        key = self._keyring.open(record.sealed, provider_id) if record.sealed else ""
        logs.register_secret(key)
        return config_service_pb2.GetProviderCredentialsResponse(provider=record.provider, api_key=key)

    # --- model configs ---------------------------------------------------------------

    async def _check_provider_for_model(self, provider_id: str, options: dict[str, Any] | None) -> None:
        row = await self._store.get_provider(provider_id)
        if row is None:
            raise InvalidArgument(
                "model_config.provider_id", f"no provider with id {provider_id}; create the provider first",
                reason="PROVIDER_NOT_FOUND",
            )  # fmt: skip
        validation.check_model_against_provider(options, records.provider_from_row(row).type)

    async def create_model_config(
        self, req: config_service_pb2.CreateModelConfigRequest
    ) -> config_pb2.ModelConfig:
        """CreateModelConfig (admin); the first enabled model becomes the default."""
        auth.require_admin()
        request_id = validation.request_id(req.request_id)
        values = validation.create_model(req)
        await self._check_provider_for_model(values["provider_id"], values["options"])
        row, created = await self._store.insert_model(request_id, values, req.model_config.is_default)
        if created:
            await self._changed(Invalidation(inv.MODEL, str(row["id"])), Invalidation(inv.DEFAULT_MODEL))
        return records.model_from_row(row)

    async def get_model_config(self, model_id: str) -> config_pb2.ModelConfig:
        """GetModelConfig; users see only enabled ones."""
        model_id = validation.uuid_field("model_config_id", model_id)
        model = await self._model(model_id)
        if model is None or (not model.enabled and not _sees_disabled()):
            raise model_not_found(model_id)
        return model

    async def list_model_configs(
        self, req: config_service_pb2.ListModelConfigsRequest
    ) -> tuple[list[config_pb2.ModelConfig], str]:
        """ListModelConfigs; users see only enabled ones."""
        include_disabled = req.include_disabled and _sees_disabled()
        size = pagination.page_size(req.page_size)
        provider_id = validation.uuid_field("provider_id", req.provider_id) if req.provider_id else ""
        kind = f"models:{provider_id}:{int(include_disabled)}"
        after = pagination.decode_token(kind, req.page_token, pagination.TIME_AND_ID)
        rows = await self._store.list_models(
            after, size + 1, provider_id=provider_id, include_disabled=include_disabled
        )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode_token(kind, [rows[-1]["create_time"].isoformat(), str(rows[-1]["id"])])
        return [records.model_from_row(r) for r in rows], token

    async def update_model_config(
        self, req: config_service_pb2.UpdateModelConfigRequest
    ) -> config_pb2.ModelConfig:
        """UpdateModelConfig (admin)."""
        auth.require_admin()
        model_id, changes = validation.update_model(req)
        if "provider_id" in changes or "options" in changes:
            current = await self._store.get_model(model_id)
            if current is None:
                raise model_not_found(model_id)
            provider_id = changes.get("provider_id", str(current["provider_id"]))
            await self._check_provider_for_model(provider_id, changes.get("options", current["options"]))
        row = await self._store.update_model(
            model_id, changes, validation.etag("model_config.etag", req.model_config.etag)
        )
        await self._changed(Invalidation(inv.MODEL, model_id))
        return records.model_from_row(row)

    async def delete_model_config(self, model_id: str, etag: str = "") -> None:
        """DeleteModelConfig (admin); the default cannot be deleted. Idempotent: a model config
        that is gone is deleted already."""
        auth.require_admin()
        model_id = validation.uuid_field("model_config_id", model_id)
        if await self._store.delete_model(model_id, validation.etag("etag", etag)):
            await self._changed(Invalidation(inv.MODEL, model_id))

    async def set_default_model_config(self, model_id: str) -> config_pb2.ModelConfig:
        """SetDefaultModelConfig (admin), atomic."""
        auth.require_admin()
        model_id = validation.uuid_field("model_config_id", model_id)
        row, _previous = await self._store.set_default_model(model_id)
        await self._changed(Invalidation(inv.DEFAULT_MODEL))
        return records.model_from_row(row)

    async def resolve_model(self, model_id: str) -> config_service_pb2.ResolveModelResponse:
        """ResolveModel: the model and its provider; a disabled or missing one falls back to the default.

        Only admins are told why (the model's name, disabled or deleted): users and services (whose
        answers reach users, e.g. chat's CreateChat) get the same reason for a disabled model, a
        model of a disabled provider and one that does not exist, so a disabled model's name and
        even its existence stay hidden, as in GetModelConfig.
        """
        reason = ""
        if model_id:
            model_id = validation.uuid_field("model_config_id", model_id)
            model = await self._model(model_id)
            if model is None:
                reason = (
                    f"model config {model_id} does not exist (it may have been deleted); using the default"
                )
            elif not model.enabled:
                reason = f"model config {model.display_name} ({model_id}) is disabled; using the default"
            else:
                provider = await self._provider(model.provider_id)
                if provider is not None and provider.provider.enabled:
                    return config_service_pb2.ResolveModelResponse(
                        model_config=model, provider=provider.provider
                    )
                reason = (
                    f"the provider of model config {model.display_name} ({model_id}) is disabled; "
                    "using the default"
                )
            if not auth.current_identity().is_admin:
                reason = f"model config {model_id} is not available; using the default"
        default = await self._default()
        if default is None:
            raise FailedPrecondition(
                "no default model is configured; an admin must add an enabled model config "
                "(agentplane admin model add)",
                reason="NO_DEFAULT_MODEL",
            )
        provider = await self._provider(default.provider_id)
        if provider is None or not provider.provider.enabled:
            raise FailedPrecondition(
                f"the provider of the default model {default.display_name} ({default.id}) is disabled; "
                "an admin must enable it or choose another default",
                reason="DEFAULT_MODEL_UNAVAILABLE",
                metadata={"model_config_id": default.id},
            )
        return config_service_pb2.ResolveModelResponse(
            model_config=default,
            provider=provider.provider,
            fell_back_to_default=bool(reason),
            fallback_reason=reason,
        )

    # --- workspace templates ---------------------------------------------------------

    async def create_workspace_template(
        self, req: config_service_pb2.CreateWorkspaceTemplateRequest
    ) -> config_pb2.WorkspaceTemplate:
        """CreateWorkspaceTemplate (admin)."""
        auth.require_admin()
        request_id = validation.request_id(req.request_id)
        values = validation.create_template(req)
        row = await self._store.insert_template(request_id, values)
        await self._changed(Invalidation(inv.TEMPLATE, str(row["id"])))
        return records.template_from_row(row)

    async def _template(self, id_or_name: str) -> config_pb2.WorkspaceTemplate | None:
        try:
            template_id: str | None = str(uuid.UUID(id_or_name))
        except ValueError:
            template_id = None
            if not validation.TEMPLATE_NAME_RE.match(id_or_name):
                raise InvalidArgument(
                    "workspace_template_id", f"must be a template id or name, got {id_or_name!r}"
                ) from None
        key = f"id:{template_id}" if template_id else f"name:{id_or_name}"

        async def load() -> config_pb2.WorkspaceTemplate | None:
            if template_id:
                row = await self._store.get_template(template_id=template_id)
            else:
                row = await self._store.get_template(name=id_or_name)
            return records.template_from_row(row) if row else None

        return await self.templates.get(key, load)

    async def get_workspace_template(self, id_or_name: str) -> config_pb2.WorkspaceTemplate:
        """GetWorkspaceTemplate by id or name; users see only enabled ones."""
        if not id_or_name:
            raise InvalidArgument("workspace_template_id", "is required (a template id or name)")
        template = await self._template(id_or_name)
        if template is None or (not template.enabled and not _sees_disabled()):
            raise NotFound(
                f"workspace template {id_or_name} not found",
                reason="WORKSPACE_TEMPLATE_NOT_FOUND",
                metadata={"workspace_template_id": id_or_name},
            )
        return template

    async def list_workspace_templates(
        self, req: config_service_pb2.ListWorkspaceTemplatesRequest
    ) -> tuple[list[config_pb2.WorkspaceTemplate], str]:
        """ListWorkspaceTemplates by name; users see only enabled ones."""
        include_disabled = req.include_disabled and _sees_disabled()
        size = pagination.page_size(req.page_size)
        kind = f"templates:{int(include_disabled)}"
        after = pagination.decode_token(kind, req.page_token, pagination.NAME)
        rows = await self._store.list_templates(after, size + 1, include_disabled=include_disabled)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode_token(kind, [rows[-1]["name"]])
        return [records.template_from_row(r) for r in rows], token

    async def update_workspace_template(
        self, req: config_service_pb2.UpdateWorkspaceTemplateRequest
    ) -> config_pb2.WorkspaceTemplate:
        """UpdateWorkspaceTemplate (admin)."""
        auth.require_admin()
        template_id, changes = validation.update_template(req)
        etag = validation.etag("workspace_template.etag", req.workspace_template.etag)
        row = await self._store.update_template(template_id, changes, etag)
        await self._changed(Invalidation(inv.TEMPLATE, template_id))
        return records.template_from_row(row)

    async def delete_workspace_template(self, template_id: str, etag: str = "") -> None:
        """DeleteWorkspaceTemplate (admin). Idempotent: a template that is gone is deleted already."""
        auth.require_admin()
        template_id = validation.uuid_field("workspace_template_id", template_id)
        if await self._store.delete_template(template_id, validation.etag("etag", etag)) is not None:
            await self._changed(Invalidation(inv.TEMPLATE, template_id))

    # --- prompts ---------------------------------------------------------------------

    async def get_system_prompt(self) -> config_pb2.SystemPrompt:
        """GetSystemPrompt: the stored prompt or the built-in default (any identity)."""
        auth.current_identity()

        async def load() -> config_pb2.SystemPrompt:
            return _system_prompt(await self._store.get_system_prompt())

        return await self.system_prompt.get("", load)

    async def update_system_prompt(self, text: str, etag: str = "") -> config_pb2.SystemPrompt:
        """UpdateSystemPrompt (admin); empty text restores the default. With `etag`, only over it."""
        auth.require_admin()
        text = validation.prompt_text("text", text, validation.MAX_SYSTEM_PROMPT_BYTES)
        row = await self._store.set_system_prompt(text, validation.etag("etag", etag))
        await self._changed(Invalidation(inv.SYSTEM_PROMPT))
        return _system_prompt(row)

    async def get_user_prompt(self, user_id: str) -> config_pb2.UserPrompt:
        """GetUserPrompt: the caller's own (or the acted-for user's), or, for admins and services
        acting for nobody, a named user's (the rule: `prompts.user_prompt_owner`)."""
        identity = auth.current_identity()
        if user_id:
            user_id = validation.user_id("user_id", user_id)
        user_id = user_prompt_owner(identity, user_id)

        async def load() -> config_pb2.UserPrompt:
            return _user_prompt(user_id, await self._store.get_user_prompt(user_id))

        return await self.user_prompts.get(user_id, load)

    async def update_user_prompt(self, text: str, etag: str = "") -> config_pb2.UserPrompt:
        """UpdateUserPrompt: the caller's own (or the acted-for user's); empty clears it. With
        `etag`, only over it."""
        user_id = auth.require_user_id()
        text = validation.prompt_text("text", text, validation.MAX_USER_PROMPT_BYTES)
        row = await self._store.set_user_prompt(user_id, text, validation.etag("etag", etag))
        await self._changed(Invalidation(inv.USER_PROMPT, user_id))
        return _user_prompt(user_id, row)


def _system_prompt(row: dict[str, Any] | None) -> config_pb2.SystemPrompt:
    """The SystemPrompt of the stored row: the built-in default while none is set (no row, or '')."""
    etag = records.etag(row) if row is not None else "0"
    if row is None or not row["text"]:
        return config_pb2.SystemPrompt(text=DEFAULT_SYSTEM_PROMPT, is_default=True, etag=etag)
    return config_pb2.SystemPrompt(
        text=row["text"], update_time=records.timestamp(row["update_time"]), etag=etag
    )


def _user_prompt(user_id: str, row: dict[str, Any] | None) -> config_pb2.UserPrompt:
    """The UserPrompt of the stored row: empty while none is set (no row, or '')."""
    if row is None:
        return config_pb2.UserPrompt(user_id=user_id, etag="0")
    if not row["text"]:
        return config_pb2.UserPrompt(user_id=user_id, etag=records.etag(row))
    return config_pb2.UserPrompt(
        user_id=user_id,
        text=row["text"],
        update_time=records.timestamp(row["update_time"]),
        etag=records.etag(row),
    )
