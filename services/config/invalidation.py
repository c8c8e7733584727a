"""Cache invalidation across processes over one Redis pub/sub channel.

Every config write publishes an `Invalidation`; every config replica and every `ConfigClient`
listens and drops the matching cache entries at once. Redis is optional: with Redis down a
publish is skipped with a warning, the listener retries in the background, caches fall back
to TTL expiry, and no caller sees an error. After every (re)subscription the listener asks
for everything to be dropped, because messages sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.config.metrics import ConfigMetrics

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "agentplane:config:invalidations"

# Invalidation kinds; `key` is the id the kind refers to (empty for singletons and ALL).
PROVIDER = "provider"
MODEL = "model"
DEFAULT_MODEL = "default_model"
TEMPLATE = "template"
SYSTEM_PROMPT = "system_prompt"
USER_PROMPT = "user_prompt"
ALL = "all"


@dataclass(frozen=True)
class Invalidation:
    """One message: drop cache entries of `kind` for `key`."""

    kind: str
    key: str = ""

    def encode(self, origin: str) -> str:
        """The wire form (JSON), tagged with the publishing process."""
        return json.dumps({"kind": self.kind, "key": self.key, "origin": origin})

    @staticmethod
    def decode(raw: bytes | str) -> tuple[Invalidation, str] | None:
        """Parse a message into (invalidation, origin); None for garbage."""
        try:
            data = json.loads(raw)
            return Invalidation(str(data["kind"]), str(data.get("key", ""))), str(data.get("origin", ""))
        except (ValueError, KeyError, TypeError):
            return None


Handler = Callable[[Invalidation], None]


def _redis(url: str, *, socket_timeout: float | None) -> aioredis.Redis:
    # No client-side retries: a Redis outage must cost a caller one fast failure, not backoff sleeps.
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=10,
    )
    return client


class InvalidationBus:
    """Publishes invalidations and feeds the ones other processes publish to `handler`."""

    def __init__(
        self,
        redis_url: str | None,
        handler: Handler,
        *,
        channel: str = DEFAULT_CHANNEL,
        metrics: ConfigMetrics | None = None,
        name: str = "config",
        max_backoff: float = 2.0,
    ) -> None:
        self._url = redis_url
        self._handler = handler
        self.channel = channel
        self._metrics = metrics or ConfigMetrics.for_registry()
        self._name = name
        self._max_backoff = max_backoff
        self.origin = uuid.uuid4().hex
        self._publisher: aioredis.Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._degraded = False

    @property
    def enabled(self) -> bool:
        """True when a Redis URL was given."""
        return self._url is not None

    @property
    def subscribed(self) -> bool:
        """True while the listener holds a live subscription."""
        return self._subscribed.is_set()

    async def start(self) -> None:
        """Start listening in the background; returns at once, even when Redis is down."""
        if self._url is None or self._listener is not None:
            return
        self._publisher = _redis(self._url, socket_timeout=1.0)
        self._listener = asyncio.create_task(self._listen(), name=f"{self._name}-invalidations")

    async def wait_subscribed(self, within: float) -> bool:
        """Wait until the listener is subscribed (tests, startup); False after `within` seconds."""
        try:
            await asyncio.wait_for(self._subscribed.wait(), within)
        except TimeoutError:
            return False
        return True

    async def publish(self, invalidation: Invalidation) -> None:
        """Tell every other process to drop `invalidation`; logs and carries on when Redis is down."""
        if self._publisher is None:
            return
        try:
            await self._publisher.publish(self.channel, invalidation.encode(self.origin))
        except Exception as exc:  # any Redis failure: the TTL is the fallback
            self._metrics.redis_errors.labels("publish").inc()
            log.warning(
                "could not publish a config invalidation; other replicas see the change after the cache TTL",
                extra={"kind": invalidation.kind, "error": repr(exc)},
            )
            return
        self._metrics.invalidations_published.inc()

    async def close(self) -> None:
        """Stop listening and close the connections."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._publisher is not None:
            await self._publisher.aclose()
            self._publisher = None

    async def _listen(self) -> None:
        assert self._url is not None
        backoff = 0.05
        while True:
            client = _redis(self._url, socket_timeout=None)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                # Messages published while we were not subscribed are lost: start from a clean slate.
                self._handler(Invalidation(ALL))
                self._subscribed.set()
                if self._degraded:
                    log.info("config invalidations from Redis are flowing again")
                    self._degraded = False
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._subscribed.clear()
                self._metrics.redis_errors.labels("listen").inc()
                if not self._degraded:
                    log.warning(
                        "Redis is unavailable; config caches fall back to TTL expiry until it returns",
                        extra={"error": repr(exc)},
                    )
                    self._degraded = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            # Reconnect with capped exponential backoff.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def _deliver(self, raw: bytes | str) -> None:
        decoded = Invalidation.decode(raw)
        if decoded is None:
            log.warning("ignoring a malformed config invalidation message")
            return
        invalidation, origin = decoded
        if origin == self.origin:
            return  # our own write: already applied locally
        try:
            self._handler(invalidation)
        except Exception:
            log.exception("config invalidation handler failed")
