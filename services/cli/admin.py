"""`agentplane admin provider|model|template|prompt|rotate-encryption-key ...`: manage the config
service as an admin.

Connection and identity: those of every client command (``--address``, ``--token``, ``--user``,
``--admin``; see `services.cli.connect`); a minted token is always an admin's. Every command takes
``--output json``. Model configs are named by id or by name (display name or provider model name).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from agentplane.config.v1 import config_pb2
from agentplane.config.v1 import config_service_pb2 as pb
from google.protobuf import field_mask_pb2

from services.cli.configrpc import (
    add_connection_arguments,
    add_text_arguments,
    call,
    list_model_configs,
    read_text,
    resolve_model,
    show,
    to_dict,
)
from services.cli.connect import open_channel
from services.cli.output import CliError, emit, notice, table

PROVIDER_TYPES = {
    "openai": config_pb2.PROVIDER_TYPE_OPENAI,
    "anthropic": config_pb2.PROVIDER_TYPE_ANTHROPIC,
    "openai-compatible": config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
}
EFFORTS = {
    name.removeprefix("REASONING_EFFORT_").lower(): v for name, v in config_pb2.ReasoningEffort.items()
}
PRICES = {
    "input_price": "input_micros_per_million",
    "output_price": "output_micros_per_million",
    "cache_read_price": "cache_read_micros_per_million",
    "cache_write_price": "cache_write_micros_per_million",
}


def _command(actions: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
    add_connection_arguments(parser)
    parser.set_defaults(func=func)
    return parser


def register(subparsers: Any) -> None:
    """Add the `admin` command group."""
    admin = subparsers.add_parser("admin", help="manage providers, models, templates and the system prompt")
    groups = admin.add_subparsers(dest="admin_group", required=True)

    provider = groups.add_parser("provider", help="LLM providers").add_subparsers(
        dest="action", required=True
    )
    p = _command(provider, "add", "add a provider", provider_add)
    p.add_argument("--type", required=True, choices=sorted(PROVIDER_TYPES))
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--base-url", default="", help="API base URL (required for openai-compatible)")
    _api_key_arguments(p)
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    _command(provider, "list", "list providers", provider_list)
    p = _command(provider, "update", "change a provider", provider_update)
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--base-url")
    _api_key_arguments(p)
    p.add_argument("--clear-api-key", action="store_true")
    _enable_arguments(p)
    p = _command(provider, "delete", "delete a provider (no model may use it)", provider_delete)
    p.add_argument("id")

    model = groups.add_parser("model", help="model configs").add_subparsers(dest="action", required=True)
    p = _command(model, "add", "add a model config", model_add)
    p.add_argument("--provider", required=True, help="provider id")
    p.add_argument("--model", required=True, help="the provider's model name")
    p.add_argument("--context-limit", type=int, required=True)
    p.add_argument("--compaction-threshold", type=int, default=80, help="percent of the context (default 80)")
    p.add_argument("--default", action="store_true", help="make it the default model")
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    _model_arguments(p)
    p = _command(model, "list", "list model configs", model_list)
    p.add_argument("--provider", default="", help="only this provider's models")
    p.add_argument("--all", action="store_true", help="include disabled models")
    p = _command(model, "set-default", "make a model the default", model_set_default)
    p.add_argument("id", help="model config id or name")
    p = _command(model, "update", "change a model config", model_update)
    p.add_argument("id", help="model config id or name")
    p.add_argument("--provider")
    p.add_argument("--model")
    p.add_argument("--context-limit", type=int)
    p.add_argument("--compaction-threshold", type=int)
    _model_arguments(p)
    _enable_arguments(p)
    p = _command(model, "delete", "delete a model config (not the default)", model_delete)
    p.add_argument("id", help="model config id or name")

    template = groups.add_parser("template", help="workspace templates").add_subparsers(
        dest="action", required=True
    )
    p = _command(template, "add", "add a workspace template", template_add)
    p.add_argument("--name", required=True)
    p.add_argument("--description", required=True, help="what it is for (the agent reads this)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dir", help="absolute directory to copy")
    source.add_argument("--git", help="git repository URL or path to clone")
    p.add_argument("--ref", default="", help="git branch, tag or commit")
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME[=DEFAULT]", help="a parameter (repeatable)"
    )
    p.add_argument("--disabled", action="store_true")
    p.add_argument(
        "--network",
        action="store_true",
        help="let commands in its workspaces use the network (git fetches, package installs); off by default",
    )
    _pod_arguments(p)
    p = _command(template, "list", "list workspace templates", template_list)
    p.add_argument("--all", action="store_true", help="include disabled templates")
    p = _command(template, "update", "change a workspace template", template_update)
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--description")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dir", help="absolute directory to copy (replaces the source)")
    source.add_argument("--git", help="git repository URL or path to clone (replaces the source)")
    p.add_argument("--ref", help="git branch, tag or commit (with --git)")
    p.add_argument(
        "--param",
        action="append",
        default=None,
        metavar="NAME[=DEFAULT]",
        help="a parameter (repeatable; replaces every parameter)",
    )
    _enable_arguments(p)
    p.add_argument(
        "--network",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow (--network) or forbid (--no-network) network use in its workspaces",
    )
    _pod_arguments(p, update=True)
    p = _command(template, "delete", "delete a workspace template", template_delete)
    p.add_argument("id")

    p = _command(
        groups,
        "rotate-encryption-key",
        "re-encrypt every stored provider API key with the first key of the config service's "
        "AGENTPLANE_ENCRYPTION_KEY (all or nothing; see docs/config.md)",
        rotate_encryption_key,
    )
    p.add_argument(
        "--validate-only",
        action="store_true",
        help="only check that every stored key decrypts and show what would be re-encrypted",
    )

    prompt = groups.add_parser("prompt", help="the deployment system prompt").add_subparsers(
        dest="action", required=True
    )
    _command(prompt, "get", "print the system prompt", system_prompt_get)
    p = _command(prompt, "set", "set the system prompt (--clear restores the default)", system_prompt_set)
    add_text_arguments(p)


def _api_key_arguments(p: argparse.ArgumentParser) -> None:
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key", default=None, help="API key (visible in shell history; prefer --api-key-env)"
    )
    key.add_argument("--api-key-env", default=None, metavar="VAR", help="read the API key from this variable")


def _enable_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--enable", dest="enabled", action="store_const", const=True, default=None)
    g.add_argument("--disable", dest="enabled", action="store_const", const=False)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="display name (default: the model name)")
    p.add_argument("--max-output-tokens", type=int)
    for flag in PRICES:
        p.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, type=int, help="micro-USD per million tokens"
        )
    p.add_argument("--temperature", type=float)
    p.add_argument("--reasoning-effort", choices=sorted(EFFORTS))
    p.add_argument("--responses-api", action="store_true", default=None, help="use OpenAI's Responses API")
    p.add_argument("--thinking-budget", type=int, help="Anthropic thinking budget tokens")


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_env:
        value = os.environ.get(args.api_key_env)
        if value is None:
            raise CliError(f"environment variable {args.api_key_env} is not set")
        return value
    return str(args.api_key) if args.api_key is not None else None


def _print_list(args: argparse.Namespace, key: str, items: Any, columns: list[str]) -> int:
    """`{key: [...]}` with ``--output json``; else a table with a header row (the last column's
    free text shortened to its first line)."""
    rows = [to_dict(item) for item in items]
    headers = [c.upper() for c in columns]
    text = table(headers, [[row.get(c, "") for c in columns] for row in rows], "(none)")
    emit(args, {key: rows}, text)
    return 0


# --- providers -------------------------------------------------------------------------


async def provider_add(args: argparse.Namespace) -> int:
    """Create a provider."""
    request = pb.CreateProviderRequest(
        provider=config_pb2.Provider(
            type=PROVIDER_TYPES[args.type],
            display_name=args.name,
            base_url=args.base_url,
            enabled=not args.disabled,
        ),
        api_key=_api_key(args) or "",
    )
    response = await call(args, "CreateProvider", request, admin=True)
    return 1 if response is None else show(args, response.provider, response.provider.id)


async def provider_list(args: argparse.Namespace) -> int:
    """List every provider (all pages)."""
    items: list[Any] = []
    token = ""
    while True:
        response = await call(
            args, "ListProviders", pb.ListProvidersRequest(page_size=500, page_token=token), admin=True
        )
        if response is None:
            return 1
        items += response.providers
        token = response.next_page_token
        if not token:
            return _print_list(
                args, "providers", items, ["id", "type", "enabled", "base_url", "display_name"]
            )


async def provider_update(args: argparse.Namespace) -> int:
    """Change the given fields of a provider."""
    provider = config_pb2.Provider(id=args.id)
    paths: list[str] = []
    if args.name is not None:
        provider.display_name = args.name
        paths.append("display_name")
    if args.base_url is not None:
        provider.base_url = args.base_url
        paths.append("base_url")
    if args.enabled is not None:
        provider.enabled = args.enabled
        paths.append("enabled")
    key = "" if args.clear_api_key else _api_key(args)
    if key is not None:
        paths.append("api_key")
    request = pb.UpdateProviderRequest(
        provider=provider, update_mask=field_mask_pb2.FieldMask(paths=paths), api_key=key or ""
    )
    response = await call(args, "UpdateProvider", request, admin=True)
    if response is None:
        return 1
    if "base_url" in paths and key is None and not response.provider.api_key_set:
        notice(
            args,
            "note: the provider has no API key now (a new base URL drops the stored key); "
            "set one with --api-key-env VAR, in the same command as --base-url",
        )
    return show(args, response.provider, f"updated {args.id}")


async def provider_delete(args: argparse.Namespace) -> int:
    """Delete a provider."""
    response = await call(args, "DeleteProvider", pb.DeleteProviderRequest(provider_id=args.id), admin=True)
    return 1 if response is None else show(args, response, f"deleted {args.id}")


async def rotate_encryption_key(args: argparse.Namespace) -> int:
    """Re-encrypt every stored provider key with the newest encryption key (RotateEncryptionKey)."""
    request = pb.RotateEncryptionKeyRequest(validate_only=args.validate_only)
    response = await call(args, "RotateEncryptionKey", request, admin=True)
    if response is None:
        return 1
    count = len(response.reencrypted_provider_ids)
    verb = "would re-encrypt" if args.validate_only else "re-encrypted"
    text = (
        f"{verb} {count} provider key(s) with key {response.key_id}; "
        f"{response.already_current_count} already used it"
    )
    return show(args, response, text)


# --- models ----------------------------------------------------------------------------


def _apply_model_arguments(args: argparse.Namespace, model: config_pb2.ModelConfig, paths: list[str]) -> None:
    simple = {
        "provider": "provider_id",
        "model": "model_name",
        "name": "display_name",
        "context_limit": "context_limit",
        "compaction_threshold": "compaction_threshold_percent",
        "max_output_tokens": "max_output_tokens",
        "enabled": "enabled",
    }
    for arg, field in simple.items():
        value = getattr(args, arg, None)
        if value is not None:
            setattr(model, field, value)
            paths.append(field)
    if any(getattr(args, flag) is not None for flag in PRICES):
        for flag, field in PRICES.items():
            setattr(model.pricing, field, getattr(args, flag) or 0)
        paths.append("pricing")
    options = model.options
    touched = False
    if args.temperature is not None:
        options.temperature, touched = args.temperature, True
    if args.reasoning_effort is not None:
        options.reasoning_effort, touched = EFFORTS[args.reasoning_effort], True  # type: ignore[assignment]
    if args.responses_api:
        options.use_responses_api, touched = True, True
    if args.thinking_budget is not None:
        options.thinking_budget_tokens, touched = args.thinking_budget, True
    if touched:
        paths.append("options")


async def model_add(args: argparse.Namespace) -> int:
    """Create a model config."""
    model = config_pb2.ModelConfig(enabled=not args.disabled, is_default=args.default)
    _apply_model_arguments(args, model, [])
    if not model.display_name:
        model.display_name = model.model_name
    response = await call(
        args, "CreateModelConfig", pb.CreateModelConfigRequest(model_config=model), admin=True
    )
    return 1 if response is None else show(args, response.model_config, response.model_config.id)


async def model_list(args: argparse.Namespace) -> int:
    """List model configs (all pages)."""
    channel = open_channel(args, "config", admin=True)
    try:
        items = await list_model_configs(args, channel, include_disabled=args.all, provider_id=args.provider)
    finally:
        await channel.close()
    if items is None:
        return 1
    columns = ["id", "model_name", "enabled", "is_default", "context_limit", "display_name"]
    return _print_list(args, "model_configs", items, columns)


async def _model_id(args: argparse.Namespace) -> str | None:
    """`args.id` as a model config id (a name is looked up; disabled models included)."""
    return await resolve_model(args, args.id, admin=True)


async def model_set_default(args: argparse.Namespace) -> int:
    """Make a model the default."""
    model_id = await _model_id(args)
    if model_id is None:
        return 1
    request = pb.SetDefaultModelConfigRequest(model_config_id=model_id)
    response = await call(args, "SetDefaultModelConfig", request, admin=True)
    return 1 if response is None else show(args, response.model_config, f"default model is now {model_id}")


async def model_update(args: argparse.Namespace) -> int:
    """Change the given fields of a model config (pricing and options are replaced whole)."""
    model_id = await _model_id(args)
    if model_id is None:
        return 1
    model = config_pb2.ModelConfig(id=model_id)
    paths: list[str] = []
    _apply_model_arguments(args, model, paths)
    request = pb.UpdateModelConfigRequest(
        model_config=model, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    response = await call(args, "UpdateModelConfig", request, admin=True)
    return 1 if response is None else show(args, response.model_config, f"updated {model_id}")


async def model_delete(args: argparse.Namespace) -> int:
    """Delete a model config."""
    model_id = await _model_id(args)
    if model_id is None:
        return 1
    response = await call(
        args, "DeleteModelConfig", pb.DeleteModelConfigRequest(model_config_id=model_id), admin=True
    )
    return 1 if response is None else show(args, response, f"deleted {model_id}")


# --- templates -------------------------------------------------------------------------


async def template_add(args: argparse.Namespace) -> int:
    """Create a workspace template."""
    template = config_pb2.WorkspaceTemplate(
        name=args.name, description=args.description, enabled=not args.disabled, network_access=args.network
    )
    if args.dir:
        template.source.directory.path = args.dir
    else:
        template.source.git.url, template.source.git.ref = args.git, args.ref
    _add_parameters(template, args.param)
    pod = _pod(args)
    if pod is not None:
        template.pod.CopyFrom(pod)
    request = pb.CreateWorkspaceTemplateRequest(workspace_template=template)
    response = await call(args, "CreateWorkspaceTemplate", request, admin=True)
    return 1 if response is None else show(args, response.workspace_template, response.workspace_template.id)


async def template_list(args: argparse.Namespace) -> int:
    """List workspace templates (all pages)."""
    items: list[Any] = []
    token = ""
    while True:
        request = pb.ListWorkspaceTemplatesRequest(page_size=500, page_token=token, include_disabled=args.all)
        response = await call(args, "ListWorkspaceTemplates", request, admin=True)
        if response is None:
            return 1
        items += response.workspace_templates
        token = response.next_page_token
        if not token:
            columns = ["id", "name", "enabled", "network_access", "description"]
            return _print_list(args, "workspace_templates", items, columns)


async def template_update(args: argparse.Namespace) -> int:
    """Change the given fields of a workspace template (source and parameters are replaced whole)."""
    template = config_pb2.WorkspaceTemplate(id=args.id)
    paths: list[str] = []
    if args.ref is not None and args.git is None:
        raise CliError("--ref needs --git (the source is replaced whole)")
    if args.name is not None:
        template.name = args.name
        paths.append("name")
    if args.description is not None:
        template.description = args.description
        paths.append("description")
    if args.dir is not None:
        template.source.directory.path = args.dir
        paths.append("source")
    elif args.git is not None:
        template.source.git.url, template.source.git.ref = args.git, args.ref or ""
        paths.append("source")
    if args.param is not None:
        _add_parameters(template, args.param)
        paths.append("parameters")
    if args.enabled is not None:
        template.enabled = args.enabled
        paths.append("enabled")
    if args.network is not None:
        template.network_access = args.network
        paths.append("network_access")
    pod = _pod(args)
    if pod is not None:
        template.pod.CopyFrom(pod)
        paths.append("pod")
    request = pb.UpdateWorkspaceTemplateRequest(
        workspace_template=template, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    response = await call(args, "UpdateWorkspaceTemplate", request, admin=True)
    return 1 if response is None else show(args, response.workspace_template, f"updated {args.id}")


def _pod_arguments(p: argparse.ArgumentParser, update: bool = False) -> None:
    """The kubernetes driver's pod settings of a template (docs/kubernetes.md)."""
    replaces = " (any of these replaces the template's pod settings whole)" if update else ""
    group = p.add_argument_group("kubernetes workspaces" + replaces)
    group.add_argument("--image", help="workspace image (it must contain the agentplane agent)")
    group.add_argument("--cpu", help="CPU request and limit, e.g. 500m or 2")
    group.add_argument("--memory", help="memory request and limit, e.g. 2Gi")
    group.add_argument("--storage", help="size of the workspace volume, e.g. 20Gi")
    group.add_argument("--storage-class", help="StorageClass of the workspace volume")
    group.add_argument(
        "--egress",
        action="append",
        metavar="CIDR[:PORT,...]",
        help="where the workspace may connect, e.g. 140.82.112.0/20:443,22 (repeatable; the git clone "
        "always, commands with --network)",
    )


def _pod(args: argparse.Namespace) -> config_pb2.WorkspacePod | None:
    """The pod settings the flags give, or None when no pod flag was given."""
    names = ("image", "cpu", "memory", "storage", "storage_class")
    if all(getattr(args, n) is None for n in names) and args.egress is None:
        return None
    pod = config_pb2.WorkspacePod(
        image=args.image or "",
        cpu=args.cpu or "",
        memory=args.memory or "",
        storage=args.storage or "",
        storage_class=args.storage_class or "",
    )
    for spec in args.egress or []:
        network, _, rest = spec.partition("/")
        length, _, ports = rest.partition(":")
        try:
            numbers = [int(port) for port in ports.split(",") if port]
        except ValueError:
            raise CliError(f"--egress {spec!r}: ports must be numbers, e.g. 10.0.0.0/8:443,22") from None
        pod.egress.add(cidr=f"{network}/{length}" if length else network, ports=numbers)
    return pod


def _add_parameters(template: config_pb2.WorkspaceTemplate, specs: list[str]) -> None:
    for spec in specs:
        name, _, default = spec.partition("=")
        template.parameters.add(name=name, default_value=default)


async def template_delete(args: argparse.Namespace) -> int:
    """Delete a workspace template."""
    request = pb.DeleteWorkspaceTemplateRequest(workspace_template_id=args.id)
    response = await call(args, "DeleteWorkspaceTemplate", request, admin=True)
    return 1 if response is None else show(args, response, f"deleted {args.id}")


# --- system prompt ---------------------------------------------------------------------


async def system_prompt_get(args: argparse.Namespace) -> int:
    """Print the system prompt."""
    response = await call(args, "GetSystemPrompt", pb.GetSystemPromptRequest(), admin=True)
    return 1 if response is None else show(args, response.system_prompt, response.system_prompt.text)


async def system_prompt_set(args: argparse.Namespace) -> int:
    """Set the system prompt."""
    request = pb.UpdateSystemPromptRequest(text=read_text(args))
    response = await call(args, "UpdateSystemPrompt", request, admin=True)
    return 1 if response is None else show(args, response.system_prompt, "system prompt updated")
