"""Connections to Postgres (psycopg 3 async pool) and Redis (redis.asyncio).

Create these once per process in a service's `build()` and pass them down; close them on
shutdown (`ServerHandle.on_stop`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis.asyncio as aioredis
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool


async def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    acquire_timeout: float = 10.0,
    statement_timeout_ms: int = 30_000,
    autocommit: bool = False,
    dict_rows: bool = True,
    name: str | None = None,
    open_timeout: float = 30.0,
    **kwargs: Any,
) -> AsyncConnectionPool[Any]:
    """Open an async pool to `url` and wait until `min_size` connections are ready.

    `acquire_timeout` bounds how long `pool.connection()` waits for a free connection;
    `statement_timeout_ms` is set on every connection (0 disables it); `dict_rows` makes
    rows dicts (``psycopg.rows.dict_row``). Extra `kwargs` go to each connection.
    """
    options = f"-c statement_timeout={int(statement_timeout_ms)}"
    conn_kwargs: dict[str, Any] = {"autocommit": autocommit, "options": options, **kwargs}
    if dict_rows:
        conn_kwargs["row_factory"] = dict_row
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=acquire_timeout,
        kwargs=conn_kwargs,
        name=name,
        max_idle=300,
        max_lifetime=3600,
        reconnect_timeout=60,
        open=False,
    )
    await pool.open(wait=True, timeout=open_timeout)
    return pool


def probe(pool: AsyncConnectionPool[Any]) -> Callable[[], Awaitable[None]]:
    """A health probe (`ServerHandle.watch_health`): ``SELECT 1`` on a connection from `pool`. A
    probe that draws a connection broken by a restart hands it back to be replaced, so the pool
    heals without waiting for a real request to trip over it."""

    async def check() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")

    return check


async def connect(url: str, *, autocommit: bool = False, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """One standalone async connection (scripts, migrations, admin statements)."""
    return await psycopg.AsyncConnection.connect(url, autocommit=autocommit, connect_timeout=10, **kwargs)


def create_redis(
    url: str,
    *,
    socket_timeout: float = 5.0,
    connect_timeout: float = 3.0,
    health_check_interval: float = 15.0,
    **kwargs: Any,
) -> aioredis.Redis:
    """A redis.asyncio client (connection pool) for `url`, with timeouts and health checks.

    Returns bytes unless ``decode_responses=True`` is passed. Close with ``await r.aclose()``.
    """
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=health_check_interval,
        retry_on_timeout=True,
        **kwargs,
    )
    return client


def with_database(url: str, dbname: str) -> str:
    """`url` pointing at database `dbname` instead (works for socket-style URLs too)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))
