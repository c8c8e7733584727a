"""`agentplane bench config`: how cheap config lookups are.

Starts an embedded Postgres (unless ``--database-url`` is given) and an embedded Redis on
127.0.0.1, migrates, runs a real config server on an ephemeral loopback port, seeds a provider
and a few models through the real RPCs, and measures:

- ``client_hit_p50_us``: `ConfigClient.resolve_model` answered from the client's cache;
- ``rpc_hit_p50_ms``: `ResolveModel` over gRPC (loopback) answered from the service's cache;
- ``db_queries_per_10k``: database queries the service made while serving 10,000 ResolveModel
  calls for a few keys, starting from cold caches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from typing import Any

from agentplane.config.v1 import config_service_pb2, config_service_pb2_grpc
from prometheus_client import CollectorRegistry

from services.bench.stats import percentile
from services.common import aio, auth
from services.common import keys as bench_keys
from services.common.client import create_channel
from services.common.db import with_database
from services.common.embedded import start_postgres, start_redis
from services.common.keys import Keys
from services.common.migrations import migrate
from services.common.settings import SERVICE_NAMES, Settings

NAME = "config"
HELP = "config lookups: client cache hit, ResolveModel RPC hit, DB queries per 10k resolves"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--client-iterations", type=int, default=20_000, help="client cache hits to time")
    parser.add_argument("--rpc-iterations", type=int, default=3_000, help="ResolveModel RPCs to time")
    parser.add_argument("--resolves", type=int, default=10_000, help="ResolveModel calls for the DB count")
    parser.add_argument("--keys", type=int, default=4, help="distinct model keys resolved")
    parser.add_argument(
        "--database-url",
        default=None,
        help="Postgres admin URL to create a scratch database on (default: embedded)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready results."""
    return aio.run(_run(args))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from services.config import server as config_server
    from services.config.client import ConfigClient
    from services.config.testing import seed_provider_and_model

    tmp = tempfile.mkdtemp(prefix="agentplane-bench-config-")
    os.chmod(tmp, 0o755)  # the embedded Postgres runs as its own user when we are root
    pg = None
    redis = await asyncio.to_thread(start_redis)
    scratch_admin_url = args.database_url
    dbname = f"bench_config_{uuid.uuid4().hex[:8]}"
    try:
        if scratch_admin_url is None:
            pg = await asyncio.to_thread(
                start_postgres, os.path.join(tmp, "pg"), delete=True, dbname="postgres"
            )
            scratch_admin_url = pg.url
        import psycopg

        async with await psycopg.AsyncConnection.connect(scratch_admin_url, autocommit=True) as conn:
            await conn.execute(f'CREATE DATABASE "{dbname}"')  # type: ignore[arg-type]
        database_url = with_database(scratch_admin_url, dbname)
        await migrate(database_url)
        keys_dir = tempfile.mkdtemp(prefix="agentplane-bench-keys-")
        bench_keys.init_dir(keys_dir, SERVICE_NAMES)
        env = {
            "AGENTPLANE_KEYS_DIR": keys_dir,
            "AGENTPLANE_ENCRYPTION_KEY": "bench:bench-encryption-key-0123456789abcdef",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis.url,
            "AGENTPLANE_CONFIG_HOST": "127.0.0.1",
            "AGENTPLANE_CONFIG_PORT": "0",
            "AGENTPLANE_LOG_LEVEL": "WARNING",
        }
        settings = Settings.from_env(env)
        server = await config_server.start(settings, registry=CollectorRegistry())
        try:
            return await _measure(
                args, server, settings.keys, redis.url, ConfigClient, seed_provider_and_model
            )
        finally:
            await server.stop()
    finally:
        if pg is None and args.database_url:
            async with await psycopg.AsyncConnection.connect(args.database_url, autocommit=True) as conn:
                await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')  # type: ignore[arg-type]
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        await asyncio.to_thread(redis.stop)
        shutil.rmtree(tmp, ignore_errors=True)


async def _measure(
    args: argparse.Namespace, server: Any, signing: Keys, redis_url: str, client_cls: Any, seed: Any
) -> dict[str, Any]:
    admin_token = auth.mint_token(signing, "bench-admin", auth.Role.ADMIN)
    model_ids: list[str] = []
    for i in range(max(1, args.keys - 1)):
        _, model_id = await seed(
            server.address,
            admin_token,
            base_url="http://127.0.0.1:9/v1",
            api_key="sk-bench",
            model_name=f"m{i}",
        )
        model_ids.append(model_id)
    keys = ["", *model_ids][: max(1, args.keys)]

    # Client cache hits.
    client = client_cls(server.address, auth.ServiceTokenProvider(signing, "chat"), redis_url=redis_url)
    await client.start()
    try:
        for key in keys:
            await client.resolve_model(key)
        client_samples: list[float] = []
        clock = time.perf_counter_ns
        for i in range(args.client_iterations):
            key = keys[i % len(keys)]
            start = clock()
            await client.resolve_model(key)
            client_samples.append((clock() - start) / 1000.0)
    finally:
        await client.close()

    # ResolveModel over gRPC, answered from the service's cache.
    channel = create_channel(server.address, token=auth.mint_service_token(signing, "chat"))
    stub = config_service_pb2_grpc.ConfigServiceStub(channel)
    try:
        requests = [config_service_pb2.ResolveModelRequest(model_config_id=k) for k in keys]
        for request in requests * 50:  # warm the caches and the connection
            await stub.ResolveModel(request)
        rpc_samples: list[float] = []
        for i in range(args.rpc_iterations):
            start_s = time.perf_counter()
            await stub.ResolveModel(requests[i % len(requests)])
            rpc_samples.append((time.perf_counter() - start_s) * 1000.0)

        # Database queries while serving N resolves from cold caches (20 calls in flight).
        server.service.apply_invalidation(_all())
        before = server.metrics.db_query_count()
        done = 0
        started_at = time.perf_counter()
        while done < args.resolves:
            batch = min(20, args.resolves - done)
            await asyncio.gather(
                *(stub.ResolveModel(requests[(done + j) % len(requests)]) for j in range(batch))
            )
            done += batch
        elapsed = time.perf_counter() - started_at
        queries = server.metrics.db_query_count() - before
    finally:
        await channel.close()

    return {
        "client_hit_p50_us": round(statistics.median(client_samples), 2),
        "client_hit_p99_us": round(percentile(client_samples, 99), 2),
        "client_iterations": args.client_iterations,
        "rpc_hit_p50_ms": round(statistics.median(rpc_samples), 3),
        "rpc_hit_p99_ms": round(percentile(rpc_samples, 99), 3),
        "rpc_iterations": args.rpc_iterations,
        "db_queries_per_10k": round(queries * 10_000 / args.resolves, 2),
        "resolves": args.resolves,
        "resolve_keys": len(keys),
        "resolves_per_second_concurrency_20": round(args.resolves / elapsed, 1),
        "targets": {"client_hit_p50_us": 20, "rpc_hit_p50_ms": 1.0, "db_queries_per_10k": 10},
    }


def _all() -> Any:
    from services.config.invalidation import ALL, Invalidation

    return Invalidation(ALL)
