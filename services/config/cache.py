"""An in-process async cache with TTLs, single-flight loads, negative caching and a generation counter.

Used by the config service for its database lookups and by `ConfigClient` for its RPCs:

- an entry lives `ttl` seconds, then the next read loads it again;
- concurrent reads of a missing key share one load (single-flight), so a burst of requests
  for a cold key makes one database query (or one RPC);
- "no such row" is cached too: a loader returning None caches None, and an exception of one of
  `negative_errors` (for example `NotFound`) is cached and raised again until it expires;
- every invalidation bumps a generation counter; a load that started before an invalidation
  still answers its callers but is not stored, so a value read before a write can never be
  cached after the write's invalidation.

No grpc, no I/O: the caller passes the loader.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CounterLike(Protocol):
    """Anything with ``inc()`` (a labelled Prometheus counter)."""

    def inc(self, amount: float = 1) -> None:
        """Add `amount`."""


class _NullCounter:
    def inc(self, amount: float = 1) -> None:
        return None


@dataclass(frozen=True)
class CacheCounters:
    """Where a cache counts hits, misses and invalidations."""

    hits: CounterLike
    misses: CounterLike
    invalidations: CounterLike

    @classmethod
    def null(cls) -> CacheCounters:
        """Counters that count nothing."""
        return cls(_NullCounter(), _NullCounter(), _NullCounter())


class _Entry(Generic[V]):
    __slots__ = ("error", "expires", "value")

    def __init__(self, value: V | None, error: BaseException | None, expires: float) -> None:
        self.value = value
        self.error = error
        self.expires = expires


class AsyncTTLCache(Generic[K, V]):
    """A TTL cache of async-loaded values; see the module docstring for the semantics."""

    def __init__(
        self,
        name: str,
        ttl: float,
        *,
        negative_errors: tuple[type[BaseException], ...] = (),
        counters: CacheCounters | None = None,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0:
            raise ValueError("ttl must not be negative")
        self.name = name
        self.ttl = ttl
        self._negative_errors = negative_errors
        self._counters = counters or CacheCounters.null()
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[K, _Entry[V]] = {}
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self.generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: K, loader: Callable[[], Awaitable[V]]) -> V:
        """The cached value of `key`, or the result of `loader()` (shared by concurrent callers)."""
        entry = self._entries.get(key)
        if entry is not None and entry.expires > self._clock():
            self._counters.hits.inc()
            if entry.error is not None:
                raise entry.error.with_traceback(None)
            return entry.value  # type: ignore[return-value]
        self._counters.misses.inc()
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._load(key, loader, self.generation))
            future.add_done_callback(_retrieve_exception)
            self._inflight[key] = future
        # shield: one caller giving up must not cancel the load the others wait for.
        return await asyncio.shield(future)

    async def _load(self, key: K, loader: Callable[[], Awaitable[V]], generation: int) -> V:
        try:
            value = await loader()
        except self._negative_errors as exc:
            self._finish(key, generation, _Entry(None, exc, self._clock() + self.ttl))
            raise
        except BaseException:
            self._finish(key, generation, None)
            raise
        self._finish(key, generation, _Entry(value, None, self._clock() + self.ttl))
        return value

    def _finish(self, key: K, generation: int, entry: _Entry[V] | None) -> None:
        current = asyncio.current_task()
        if self._inflight.get(key) is current:
            del self._inflight[key]
        # A load that raced an invalidation answers its callers but is not stored.
        if entry is None or generation != self.generation or self.ttl == 0:
            return
        if len(self._entries) >= self._max_entries and key not in self._entries:
            self._evict()
        self._entries[key] = entry

    def _evict(self) -> None:
        now = self._clock()
        for k in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[k]
        while len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]  # oldest insertion first

    def invalidate(self, key: K) -> None:
        """Drop `key` now; a load of it already running will not be stored."""
        self.generation += 1
        self._entries.pop(key, None)
        self._inflight.pop(key, None)
        self._counters.invalidations.inc()

    def invalidate_all(self) -> None:
        """Drop every entry now; loads already running will not be stored."""
        self.generation += 1
        self._entries.clear()
        self._inflight.clear()
        self._counters.invalidations.inc()


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    # Mark the exception as retrieved: every caller may have been cancelled before it finished.
    if not future.cancelled():
        future.exception()
