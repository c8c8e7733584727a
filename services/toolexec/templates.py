"""Workspace templates: fetched from the config service, parameters checked and substituted.

Domain code depends only on the `TemplateFetcher` protocol and the `Template` dataclass, so it
is tested without a config server; `ConfigTemplateFetcher` adapts the config client library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.errors import FailedPrecondition, InvalidArgument

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


@dataclass(frozen=True)
class TemplateParameter:
    """One parameter a template accepts."""

    name: str
    default_value: str = ""
    required: bool = False


@dataclass(frozen=True)
class DirectoryFill:
    """Copy a directory on this host into the workspace."""

    path: str


@dataclass(frozen=True)
class GitFill:
    """Clone a repository (URL or local path) into the workspace, then check out `ref` if set."""

    url: str
    ref: str = ""
    # For a local path built from parameters: the directory the admin's literal prefix names; the
    # path must stay inside it (a user cannot point the clone at another user's files).
    local_root: str = ""


TemplateFill = DirectoryFill | GitFill


@dataclass(frozen=True)
class EgressRule:
    """A network (CIDR) and TCP ports (empty: every port) a workspace pod may connect to."""

    cidr: str
    ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class PodSettings:
    """The template's wishes for a Kubernetes workspace pod; empty fields take the driver's defaults."""

    image: str = ""
    cpu: str = ""
    memory: str = ""
    storage: str = ""
    storage_class: str = ""
    egress: tuple[EgressRule, ...] = ()


@dataclass(frozen=True)
class Template:
    """A workspace template as toolexec needs it."""

    id: str
    name: str
    enabled: bool
    source: DirectoryFill | GitFill | None
    parameters: tuple[TemplateParameter, ...] = field(default_factory=tuple)
    # Whether commands in workspaces made from it may use the network (git fetches, installs).
    network: bool = False
    # How the kubernetes driver runs its workspaces (the other drivers ignore it).
    pod: PodSettings | None = None


class TemplateFetcher(Protocol):
    """Where templates come from (the config service in production)."""

    async def fetch(self, id_or_name: str) -> Template:
        """The template with this id or name; raises NotFound when there is none."""


def resolve_parameters(template: Template, given: Mapping[str, str]) -> dict[str, str]:
    """Given values plus defaults; unknown names and missing required values are INVALID_ARGUMENT."""
    known = {p.name: p for p in template.parameters}
    for name in given:
        if name not in known:
            names = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(
                f"parameters.{name}",
                f"template {template.name!r} has no parameter {name!r} (its parameters: {names})",
            )
    values: dict[str, str] = {}
    for p in template.parameters:
        value = given.get(p.name, "") or p.default_value
        if p.required and not value:
            raise InvalidArgument(
                f"parameters.{p.name}", f"template {template.name!r} requires parameter {p.name!r}"
            )
        values[p.name] = value
    return values


def substitute(text: str, values: Mapping[str, str], template_name: str) -> str:
    """Replace every ``{name}`` in `text` with its parameter value."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise FailedPrecondition(
                f"template {template_name!r} references an undefined parameter {{{name}}}",
                reason="TEMPLATE_INVALID",
            )
        return values[name]

    return _PLACEHOLDER.sub(repl, text)


def fill_for(template: Template, values: Mapping[str, str]) -> TemplateFill:
    """The concrete fill instruction for a template and its resolved parameter values."""
    source = template.source
    if isinstance(source, GitFill):
        url = substitute(source.url, values, template.name)
        if not url:
            raise FailedPrecondition(
                f"template {template.name!r} has an empty git URL", reason="TEMPLATE_INVALID"
            )
        local_root = ""
        if "{" in source.url and source.url.startswith("/"):
            local_root = source.url[: source.url.index("{")].rsplit("/", 1)[0] or "/"
        return GitFill(url=url, ref=substitute(source.ref, values, template.name), local_root=local_root)
    if isinstance(source, DirectoryFill):
        if not source.path.startswith("/"):
            raise FailedPrecondition(
                f"template {template.name!r} directory source must be an absolute path",
                reason="TEMPLATE_INVALID",
            )
        return DirectoryFill(path=source.path)
    raise FailedPrecondition(f"template {template.name!r} has no source", reason="TEMPLATE_INVALID")


def template_from_proto(message: Any) -> Template:
    """Convert a ``config_pb2.WorkspaceTemplate`` (no grpc import needed) to a `Template`."""
    kind = message.source.WhichOneof("kind")
    source: DirectoryFill | GitFill | None = None
    if kind == "directory":
        source = DirectoryFill(path=message.source.directory.path)
    elif kind == "git":
        source = GitFill(url=message.source.git.url, ref=message.source.git.ref)
    return Template(
        id=message.id,
        name=message.name,
        enabled=message.enabled,
        source=source,
        parameters=tuple(TemplateParameter(p.name, p.default_value, p.required) for p in message.parameters),
        network=message.network_access,
        pod=pod_settings_from_proto(message.pod) if message.HasField("pod") else None,
    )


def pod_settings_from_proto(message: Any) -> PodSettings:
    """Convert a ``config_pb2.WorkspacePod``."""
    return PodSettings(
        image=message.image,
        cpu=message.cpu,
        memory=message.memory,
        storage=message.storage,
        storage_class=message.storage_class,
        egress=tuple(EgressRule(rule.cidr, tuple(rule.ports)) for rule in message.egress),
    )
