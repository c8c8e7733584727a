"""Prometheus collectors of the config service and its client: cache hits, misses, invalidations,
database queries, and invalidation messages published or lost while Redis was down."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter

from services.common.metrics import PerRegistry
from services.config.cache import CacheCounters


class ConfigMetrics(PerRegistry):
    """The config collectors registered in one registry (one set per registry, like `RpcMetrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.cache_hits = Counter(
            "agentplane_config_cache_hits",
            "Config cache reads answered from memory.",
            ["cache"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "agentplane_config_cache_misses",
            "Config cache reads that had to load (or join a running load).",
            ["cache"],
            registry=registry,
        )
        self.cache_invalidations = Counter(
            "agentplane_config_cache_invalidations",
            "Config cache invalidations (local writes and Redis messages).",
            ["cache"],
            registry=registry,
        )
        self.db_queries = Counter(
            "agentplane_config_db_queries",
            "Database queries made by the config service.",
            ["op"],
            registry=registry,
        )
        self.invalidations_published = Counter(
            "agentplane_config_invalidations_published",
            "Invalidation messages published on Redis.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "agentplane_config_redis_errors",
            "Redis failures while publishing or listening for invalidations (caches fell back to TTLs).",
            ["op"],
            registry=registry,
        )

    def cache_counters(self, cache: str) -> CacheCounters:
        """Pre-labelled counters for the cache named `cache` (labels resolved once, off the hot path)."""
        return CacheCounters(
            hits=self.cache_hits.labels(cache),
            misses=self.cache_misses.labels(cache),
            invalidations=self.cache_invalidations.labels(cache),
        )

    def db_query_count(self) -> float:
        """Total database queries counted so far (for benchmarks and tests)."""
        return sum(sample.value for sample in self._samples(self.db_queries, "_total"))

    @staticmethod
    def _samples(counter: Counter, suffix: str) -> list[prometheus_client.samples.Sample]:
        return [s for metric in counter.collect() for s in metric.samples if s.name.endswith(suffix)]
