"""Keeping a service's RevocationList fresh: from the database (config) or from config (the rest)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import grpc.aio
from agentplane.config.v1 import token_service_pb2 as pb
from agentplane.config.v1 import token_service_pb2_grpc as pb_grpc

from services.common.auth import ServiceTokenProvider
from services.common.client import create_channel
from services.common.settings import Settings
from services.tokens.revocations import Fetch, RevocationList, RevocationPoller
from services.tokens.store import RevocationStore

PAGE_SIZE = 10_000
Stop = Callable[[], Awaitable[None]]


def from_store(store: RevocationStore) -> Fetch:
    """Every current revocation, read from Postgres (the config process)."""

    async def fetch() -> Iterable[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        after = ""
        while True:
            rows = await store.active(after, PAGE_SIZE)
            out += [(r.token_id, r.expire_time.timestamp()) for r in rows]
            if len(rows) < PAGE_SIZE:
                return out
            after = rows[-1].token_id

    return fetch


def from_config(channel: grpc.aio.Channel, timeout: float = 10.0) -> Fetch:
    """Every current revocation, listed from the config service (with this service's token)."""
    stub = pb_grpc.TokenServiceStub(channel)

    async def fetch() -> Iterable[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        token = ""
        while True:
            resp = await stub.ListRevokedTokens(
                pb.ListRevokedTokensRequest(page_size=PAGE_SIZE, page_token=token), timeout=timeout
            )
            out += [(r.token_id, float(r.expire_time.ToSeconds())) for r in resp.revoked_tokens]
            token = resp.next_page_token
            if not token:
                return out

    return fetch


async def follow_config(settings: Settings, service_name: str) -> tuple[RevocationList, Stop]:
    """A RevocationList kept fresh from the config service, and the coroutine that stops it."""
    tokens = ServiceTokenProvider(settings.keys, service_name)
    channel = create_channel(settings.address("config"), token_provider=tokens)
    revocations = RevocationList()
    poller = RevocationPoller(revocations, from_config(channel), settings.revocation_refresh_seconds)
    poller.start()

    async def stop() -> None:
        await poller.stop()
        await channel.close()

    return revocations, stop
