"""SDK clients, one per provider, reused across requests and rebuilt when the provider changes.

A client owns an HTTP connection pool, so reusing it keeps connections warm. The cache key is
the provider id; the entry is replaced when the provider's type, base URL or key changes. A
replaced client may still serve in-flight streams, so it is closed only after the read timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
from agentplane.config.v1 import config_pb2

from services.common.errors import FailedPrecondition


@dataclass(frozen=True)
class _Entry:
    fingerprint: tuple[int, str, str]
    client: Any


class ProviderClients:
    """Cache of `openai.AsyncOpenAI` / `anthropic.AsyncAnthropic` clients keyed by provider id."""

    def __init__(self, *, connect_timeout_s: float = 10.0, read_timeout_s: float = 300.0) -> None:
        self._timeout = httpx2.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._retire_after = read_timeout_s
        self._entries: dict[str, _Entry] = {}
        # Replaced clients waiting to be closed, by the task that closes them.
        self._retiring: dict[asyncio.Task[None], Any] = {}
        self.builds = 0

    def get(self, provider: config_pb2.Provider, api_key: str) -> Any:
        """The client for `provider` with `api_key`, built on first use or after a change."""
        fingerprint = (provider.type, provider.base_url, api_key)
        entry = self._entries.get(provider.id)
        if entry is not None and entry.fingerprint == fingerprint:
            return entry.client
        client = self._build(provider, api_key)
        self._entries[provider.id] = _Entry(fingerprint, client)
        if entry is not None:
            self._retire(entry.client)
        return client

    def forget(self, provider_id: str) -> None:
        """Drop a provider's client (after the provider refused its key, say)."""
        entry = self._entries.pop(provider_id, None)
        if entry is not None:
            self._retire(entry.client)

    async def close(self) -> None:
        """Close every client (service shutdown)."""
        entries, self._entries = list(self._entries.values()), {}
        retiring, self._retiring = self._retiring, {}
        for task in retiring:
            task.cancel()
        # The retired clients too: their close was still waiting, and an unclosed client leaves
        # its connection pool open ("Unclosed client session" at exit).
        for client in [*(e.client for e in entries), *retiring.values()]:
            with contextlib.suppress(Exception):
                await client.close()

    def _build(self, provider: config_pb2.Provider, api_key: str) -> Any:
        self.builds += 1
        base_url = provider.base_url or None
        # max_retries=0: the SDKs' own retries are off; our retry loop (with events) is the only one.
        if provider.type == config_pb2.PROVIDER_TYPE_ANTHROPIC:
            return anthropic.AsyncAnthropic(
                api_key=api_key or "unset",
                base_url=base_url,
                max_retries=0,
                timeout=self._timeout,
                http_client=anthropic.DefaultAioHttpClient(timeout=self._timeout),
            )
        if provider.type in (config_pb2.PROVIDER_TYPE_OPENAI, config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE):
            if provider.type == config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE and not base_url:
                raise FailedPrecondition(
                    f"provider {provider.id} is OpenAI-compatible but has no base URL",
                    reason="MODEL_NOT_AVAILABLE",
                    metadata={"provider_id": provider.id},
                )
            # Local OpenAI-compatible servers often need no key, but the SDK insists on one.
            return openai.AsyncOpenAI(
                api_key=api_key or "unset",
                base_url=base_url,
                max_retries=0,
                timeout=self._timeout,
                http_client=openai.DefaultAioHttpClient(timeout=self._timeout),
            )
        raise FailedPrecondition(
            f"provider {provider.id} has an unsupported type {provider.type}",
            reason="MODEL_NOT_AVAILABLE",
            metadata={"provider_id": provider.id},
        )

    def _retire(self, client: Any) -> None:
        async def close_later() -> None:
            await asyncio.sleep(self._retire_after)
            with contextlib.suppress(Exception):
                await client.close()

        try:
            task = asyncio.get_running_loop().create_task(close_later())
        except RuntimeError:
            return
        self._retiring[task] = client
        task.add_done_callback(lambda t: self._retiring.pop(t, None))
