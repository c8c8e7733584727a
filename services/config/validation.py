"""Request validation: every check raises `InvalidArgument` naming the offending field.

Functions here turn request protos into plain column values for the store; they never echo an
API key back in a message.
"""

from __future__ import annotations

import ipaddress
import math
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

from agentplane.config.v1 import config_pb2, config_service_pb2
from google.protobuf import field_mask_pb2

from services.common.errors import InvalidArgument
from services.config.records import to_json

MAX_NAME_CHARS = 200
MAX_URL_CHARS = 2048
MAX_API_KEY_CHARS = 8192
MAX_REQUEST_ID_CHARS = 200
MAX_ETAG_CHARS = 64
MAX_DESCRIPTION_CHARS = 8000
MAX_PARAMETERS = 50
MAX_SYSTEM_PROMPT_BYTES = 256 * 1024
MAX_USER_PROMPT_BYTES = 32 * 1024
TEMPLATE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PARAMETER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

PROVIDER_UPDATE_PATHS = ("display_name", "base_url", "enabled", "api_key")
MODEL_UPDATE_PATHS = (
    "provider_id",
    "model_name",
    "display_name",
    "enabled",
    "context_limit",
    "compaction_threshold_percent",
    "max_output_tokens",
    "pricing",
    "options",
)
TEMPLATE_UPDATE_PATHS = ("name", "description", "parameters", "source", "enabled", "network_access", "pod")
# The kubernetes driver's pod settings of a template (WorkspacePod): what the API server accepts.
MAX_IMAGE_CHARS = 512
MAX_EGRESS_RULES = 50
MAX_EGRESS_PORTS = 20
IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
STORAGE_CLASS_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def uuid_field(field: str, value: str) -> str:
    """`value` as a canonical UUID string; InvalidArgument naming `field` when empty or malformed."""
    if not value:
        raise InvalidArgument(field, "is required")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(
            field, f"must be an id returned by the service (a UUID), got {value!r}"
        ) from None


def request_id(value: str) -> str:
    """The idempotency key (optional)."""
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    return value


def etag(field: str, value: str) -> str:
    """An etag a client sent back (optional; checked against the resource's by the store)."""
    if len(value) > MAX_ETAG_CHARS:
        raise InvalidArgument(
            field, f"must be an etag the service returned (at most {MAX_ETAG_CHARS} characters)"
        )
    return value


def _text(field: str, value: str, *, required: bool, max_chars: int = MAX_NAME_CHARS) -> str:
    value = value.strip()
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"must be at most {max_chars} characters, got {len(value)}")
    return value


def base_url(field: str, value: str, provider_type: int) -> str:
    """An http(s) URL, or empty for the provider's public default (not allowed for OpenAI-compatible)."""
    value = value.strip()
    if not value:
        if provider_type == config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE:
            raise InvalidArgument(field, "is required for PROVIDER_TYPE_OPENAI_COMPATIBLE providers")
        return ""
    if len(value) > MAX_URL_CHARS:
        raise InvalidArgument(field, f"must be at most {MAX_URL_CHARS} characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(field, f"must be an http:// or https:// URL with a host, got {value!r}")
    return value


def api_key(field: str, value: str) -> str:
    """An API key: printable, no whitespace (the message never repeats the key)."""
    if len(value) > MAX_API_KEY_CHARS:
        raise InvalidArgument(field, f"must be at most {MAX_API_KEY_CHARS} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise InvalidArgument(field, "must not contain whitespace or control characters")
    return value


def provider_type(field: str, value: int) -> str:
    """The enum name stored for a provider type."""
    if value == config_pb2.PROVIDER_TYPE_UNSPECIFIED or value not in config_pb2.ProviderType.values():
        known = ", ".join(n for n in config_pb2.ProviderType.keys() if not n.endswith("UNSPECIFIED"))
        raise InvalidArgument(field, f"must be one of {known}")
    return config_pb2.ProviderType.Name(value)  # type: ignore[arg-type]


def create_provider(req: config_service_pb2.CreateProviderRequest) -> dict[str, Any]:
    """Columns of a new provider (api_key kept separate as ``api_key``)."""
    if not req.HasField("provider"):
        raise InvalidArgument("provider", "is required")
    p = req.provider
    type_name = provider_type("provider.type", p.type)
    return {
        "type": type_name,
        "display_name": _text("provider.display_name", p.display_name, required=True),
        "base_url": base_url("provider.base_url", p.base_url, p.type),
        "enabled": p.enabled,
        "api_key": api_key("api_key", req.api_key),
    }


def update_paths(mask: field_mask_pb2.FieldMask, allowed: tuple[str, ...]) -> list[str]:
    """The mask's paths, each one of `allowed`; at least one."""
    paths = list(dict.fromkeys(mask.paths))
    if not paths:
        raise InvalidArgument("update_mask", f"must name at least one field of: {', '.join(allowed)}")
    for path in paths:
        if path not in allowed:
            raise InvalidArgument(
                "update_mask", f"cannot update {path!r}; updatable fields: {', '.join(allowed)}"
            )
    return paths


def update_provider(
    req: config_service_pb2.UpdateProviderRequest, current_type: int
) -> tuple[str, dict[str, Any]]:
    """(provider id, changes) of an UpdateProvider; ``api_key`` in changes when the mask names it."""
    provider_id = uuid_field("provider.id", req.provider.id)
    paths = update_paths(req.update_mask, PROVIDER_UPDATE_PATHS)
    changes: dict[str, Any] = {}
    for path in paths:
        if path == "display_name":
            changes[path] = _text("provider.display_name", req.provider.display_name, required=True)
        elif path == "base_url":
            changes[path] = base_url("provider.base_url", req.provider.base_url, current_type)
        elif path == "enabled":
            changes[path] = req.provider.enabled
        elif path == "api_key":
            changes[path] = api_key("api_key", req.api_key)
    return provider_id, changes


def model_fields(model: config_pb2.ModelConfig, paths: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Validated column values of the named model fields (``provider_id`` only syntax-checked here)."""
    out: dict[str, Any] = {}
    for path in paths:
        field = f"model_config.{path}"
        if path == "provider_id":
            out[path] = uuid_field(field, model.provider_id)
        elif path == "model_name":
            out[path] = _text(field, model.model_name, required=True)
        elif path == "display_name":
            out[path] = _text(field, model.display_name or model.model_name, required=True)
        elif path == "enabled":
            out[path] = model.enabled
        elif path == "context_limit":
            if model.context_limit <= 0:
                raise InvalidArgument(field, f"must be greater than zero, got {model.context_limit}")
            out[path] = model.context_limit
        elif path == "compaction_threshold_percent":
            if not 0 <= model.compaction_threshold_percent <= 100:
                raise InvalidArgument(
                    field, f"must be between 0 and 100, got {model.compaction_threshold_percent}"
                )
            out[path] = model.compaction_threshold_percent
        elif path == "max_output_tokens":
            if model.max_output_tokens < 0:
                raise InvalidArgument(field, f"must not be negative, got {model.max_output_tokens}")
            out[path] = model.max_output_tokens
        elif path == "pricing":
            out[path] = _pricing(model) if model.HasField("pricing") else None
        elif path == "options":
            out[path] = _options(model.options)
    return out


def _pricing(model: config_pb2.ModelConfig) -> dict[str, Any]:
    for name in (
        "input_micros_per_million",
        "output_micros_per_million",
        "cache_read_micros_per_million",
        "cache_write_micros_per_million",
    ):
        value = getattr(model.pricing, name)
        if value < 0:
            raise InvalidArgument(f"model_config.pricing.{name}", f"must not be negative, got {value}")
    return to_json(model.pricing)


def _options(options: config_pb2.ModelOptions) -> dict[str, Any]:
    if options.HasField("temperature"):
        t = options.temperature
        if not math.isfinite(t) or not 0.0 <= t <= 2.0:
            raise InvalidArgument("model_config.options.temperature", f"must be between 0 and 2, got {t}")
    if options.reasoning_effort not in config_pb2.ReasoningEffort.values():
        raise InvalidArgument(
            "model_config.options.reasoning_effort", f"unknown value {options.reasoning_effort}"
        )
    if options.thinking_budget_tokens < 0:
        raise InvalidArgument(
            "model_config.options.thinking_budget_tokens",
            f"must not be negative, got {options.thinking_budget_tokens}",
        )
    return to_json(options)


def check_model_against_provider(options: dict[str, Any] | None, provider_type_value: int) -> None:
    """Options that only make sense for some provider types."""
    if (
        options
        and options.get("use_responses_api")
        and provider_type_value != config_pb2.PROVIDER_TYPE_OPENAI
    ):
        raise InvalidArgument(
            "model_config.options.use_responses_api", "is only supported for PROVIDER_TYPE_OPENAI providers"
        )


def create_model(req: config_service_pb2.CreateModelConfigRequest) -> dict[str, Any]:
    """Columns of a new model config (``is_default`` handled by the caller)."""
    if not req.HasField("model_config"):
        raise InvalidArgument("model_config", "is required")
    values = model_fields(req.model_config, MODEL_UPDATE_PATHS)
    if req.model_config.is_default and not req.model_config.enabled:
        raise InvalidArgument("model_config.is_default", "a disabled model cannot be the default; enable it")
    return values


def update_model(req: config_service_pb2.UpdateModelConfigRequest) -> tuple[str, dict[str, Any]]:
    """(model id, changes) of an UpdateModelConfig."""
    model_id = uuid_field("model_config.id", req.model_config.id)
    if "is_default" in req.update_mask.paths:
        raise InvalidArgument("update_mask", "is_default cannot be updated here; use SetDefaultModelConfig")
    paths = update_paths(req.update_mask, MODEL_UPDATE_PATHS)
    return model_id, model_fields(req.model_config, paths)


def template_fields(
    template: config_pb2.WorkspaceTemplate, paths: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """Validated column values of the named template fields."""
    out: dict[str, Any] = {}
    for path in paths:
        field = f"workspace_template.{path}"
        if path == "name":
            if not TEMPLATE_NAME_RE.match(template.name):
                raise InvalidArgument(
                    field,
                    "must be 1-63 characters of lowercase letters, digits, '-' or '_', starting with a "
                    f"letter or digit, got {template.name!r}",
                )
            out[path] = template.name
        elif path == "description":
            out[path] = _text(field, template.description, required=True, max_chars=MAX_DESCRIPTION_CHARS)
        elif path == "parameters":
            out[path] = _parameters(template)
        elif path == "source":
            out[path] = _source(template)
        elif path == "enabled":
            out[path] = template.enabled
        elif path == "network_access":
            out[path] = template.network_access
        elif path == "pod":
            out[path] = _pod(template) if template.HasField("pod") else None
    return out


def _pod(template: config_pb2.WorkspaceTemplate) -> dict[str, Any]:
    pod = template.pod
    field = "workspace_template.pod"
    if pod.image and (len(pod.image) > MAX_IMAGE_CHARS or not IMAGE_RE.match(pod.image)):
        raise InvalidArgument(
            f"{field}.image",
            f"must be a container image reference (registry/name:tag), got {pod.image[:80]!r}",
        )
    for name in ("cpu", "memory", "storage"):
        value = getattr(pod, name)
        if value and not QUANTITY_RE.match(value):
            raise InvalidArgument(
                f"{field}.{name}", f"must be a Kubernetes quantity such as 500m, 2 or 4Gi, got {value[:40]!r}"
            )
    if pod.storage_class and not STORAGE_CLASS_RE.match(pod.storage_class):
        raise InvalidArgument(
            f"{field}.storage_class", f"must be a StorageClass name, got {pod.storage_class[:80]!r}"
        )
    if len(pod.egress) > MAX_EGRESS_RULES:
        raise InvalidArgument(f"{field}.egress", f"at most {MAX_EGRESS_RULES} rules are allowed")
    for i, rule in enumerate(pod.egress):
        try:
            ipaddress.ip_network(rule.cidr, strict=True)
        except ValueError:
            raise InvalidArgument(
                f"{field}.egress[{i}].cidr",
                f"must be a network in CIDR notation with no host bits set (e.g. 140.82.112.0/20), "
                f"got {rule.cidr[:60]!r}",
            ) from None
        if len(rule.ports) > MAX_EGRESS_PORTS:
            raise InvalidArgument(f"{field}.egress[{i}].ports", f"at most {MAX_EGRESS_PORTS} ports per rule")
        for port in rule.ports:
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"{field}.egress[{i}].ports", f"must be TCP ports 1-65535, got {port}")
    return to_json(pod)


def _parameters(template: config_pb2.WorkspaceTemplate) -> list[dict[str, Any]]:
    if len(template.parameters) > MAX_PARAMETERS:
        raise InvalidArgument(
            "workspace_template.parameters", f"at most {MAX_PARAMETERS} parameters are allowed"
        )
    seen: set[str] = set()
    for i, param in enumerate(template.parameters):
        field = f"workspace_template.parameters[{i}].name"
        if not PARAMETER_NAME_RE.match(param.name):
            raise InvalidArgument(field, f"must be an identifier (letters, digits, '_'), got {param.name!r}")
        if param.name in seen:
            raise InvalidArgument(field, f"duplicate parameter name {param.name!r}")
        seen.add(param.name)
        _text(f"workspace_template.parameters[{i}].description", param.description, required=False,
              max_chars=MAX_DESCRIPTION_CHARS)  # fmt: skip
    return [to_json(p) for p in template.parameters]


def _source(template: config_pb2.WorkspaceTemplate) -> dict[str, Any]:
    source = template.source
    kind = source.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("workspace_template.source", "is required: give a directory or a git source")
    if kind == "directory":
        if not source.directory.path.startswith("/"):
            raise InvalidArgument(
                "workspace_template.source.directory.path",
                f"must be an absolute path, got {source.directory.path!r}",
            )
    elif not source.git.url.strip():
        raise InvalidArgument("workspace_template.source.git.url", "is required")
    return to_json(source)


def create_template(req: config_service_pb2.CreateWorkspaceTemplateRequest) -> dict[str, Any]:
    """Columns of a new workspace template."""
    if not req.HasField("workspace_template"):
        raise InvalidArgument("workspace_template", "is required")
    return template_fields(req.workspace_template, TEMPLATE_UPDATE_PATHS)


def update_template(req: config_service_pb2.UpdateWorkspaceTemplateRequest) -> tuple[str, dict[str, Any]]:
    """(template id, changes) of an UpdateWorkspaceTemplate."""
    template_id = uuid_field("workspace_template.id", req.workspace_template.id)
    paths = update_paths(req.update_mask, TEMPLATE_UPDATE_PATHS)
    return template_id, template_fields(req.workspace_template, paths)


def prompt_text(field: str, value: str, max_bytes: int) -> str:
    """A prompt text of at most `max_bytes` UTF-8 bytes (kept as given; only all-whitespace becomes empty)."""
    size = len(value.encode())
    if size > max_bytes:
        raise InvalidArgument(field, f"must be at most {max_bytes} bytes of UTF-8, got {size}")
    return value if value.strip() else ""


def user_id(field: str, value: str) -> str:
    """A user id named in a request."""
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(field, f"must be at most {MAX_NAME_CHARS} characters")
    if value.startswith("service:"):
        raise InvalidArgument(field, "must be a user id, not a service identity")
    return value
