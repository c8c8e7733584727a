"""The TTL cache on its own: single-flight, negative caching, generation counter, TTL, eviction."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import NotFound
from services.config.cache import AsyncTTLCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_misses_share_one_load() -> None:
    cache: AsyncTTLCache[str, int] = AsyncTTLCache("t", 10)
    release = asyncio.Event()
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    tasks = [asyncio.create_task(cache.get("k", load)) for _ in range(20)]
    await asyncio.sleep(0)  # let every task reach the cache before the load finishes
    release.set()
    assert await asyncio.gather(*tasks) == [42] * 20
    assert calls == 1
    assert await cache.get("k", load) == 42
    assert calls == 1


async def test_ttl_expiry_reloads() -> None:
    clock = FakeClock()
    cache: AsyncTTLCache[str, int] = AsyncTTLCache("t", 5, clock=clock)
    values = iter([1, 2])

    async def load() -> int:
        return next(values)

    assert await cache.get("k", load) == 1
    clock.now += 4.9
    assert await cache.get("k", load) == 1
    clock.now += 0.2
    assert await cache.get("k", load) == 2


async def test_none_and_negative_errors_are_cached_other_errors_are_not() -> None:
    cache: AsyncTTLCache[str, int | None] = AsyncTTLCache("t", 10, negative_errors=(NotFound,))
    calls = {"none": 0, "nf": 0, "boom": 0}

    async def none() -> int | None:
        calls["none"] += 1
        return None

    async def not_found() -> int | None:
        calls["nf"] += 1
        raise NotFound("nope", reason="MODEL_CONFIG_NOT_FOUND")

    async def boom() -> int | None:
        calls["boom"] += 1
        raise RuntimeError("transient")

    for _ in range(3):
        assert await cache.get("a", none) is None
        with pytest.raises(NotFound):
            await cache.get("b", not_found)
        with pytest.raises(RuntimeError):
            await cache.get("c", boom)
    assert calls == {"none": 1, "nf": 1, "boom": 3}


async def test_load_that_raced_an_invalidation_is_not_stored() -> None:
    cache: AsyncTTLCache[str, str] = AsyncTTLCache("t", 10)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_old() -> str:
        started.set()
        await release.wait()
        return "old"

    first = asyncio.create_task(cache.get("k", slow_old))
    await started.wait()
    cache.invalidate("k")  # a write happened while the read was in flight
    release.set()
    assert await first == "old"  # the caller that asked before the write gets its answer

    async def fresh() -> str:
        return "new"

    assert await cache.get("k", fresh) == "new"  # but the stale value was never cached


async def test_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    cache: AsyncTTLCache[str, int] = AsyncTTLCache("t", 10)
    release = asyncio.Event()

    async def load() -> int:
        await release.wait()
        return 7

    impatient = asyncio.create_task(cache.get("k", load))
    patient = asyncio.create_task(cache.get("k", load))
    await asyncio.sleep(0)
    impatient.cancel()
    release.set()
    assert await patient == 7
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_eviction_bounds_the_size() -> None:
    cache: AsyncTTLCache[int, int] = AsyncTTLCache("t", 10, max_entries=3)
    for i in range(10):

        async def load(i: int = i) -> int:
            return i

        await cache.get(i, load)
    assert len(cache) <= 3
