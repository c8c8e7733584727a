"""Adapter: workspace templates from the config service, through its client library."""

from __future__ import annotations

from services.config.client import ConfigClient
from services.toolexec.templates import Template, template_from_proto


class ConfigTemplateFetcher:
    """A `TemplateFetcher` backed by `ConfigClient` (cached, invalidated through Redis)."""

    def __init__(self, client: ConfigClient) -> None:
        self._client = client

    async def fetch(self, id_or_name: str) -> Template:
        """The enabled template with this id or name; NotFound (WORKSPACE_TEMPLATE_NOT_FOUND) otherwise."""
        return template_from_proto(await self._client.get_workspace_template(id_or_name))
