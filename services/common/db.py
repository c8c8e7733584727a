"""Connections to Postgres (psycopg 3 async pool) and Redis (redis.asyncio).

Create these once per process in a service's `build()` and pass them down; close them on
shutdown (`ServerHandle.on_stop`). `database_error` says what a failure of the database (not of a
statement) means to a caller; the error interceptor answers with it instead of INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
import redis.asyncio as aioredis
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from services.common.errors import Aborted, AgentplaneError, Unavailable

log = logging.getLogger(__name__)

# ErrorInfo reasons of database failures (the services' ErrorReason enums carry them too).
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
DATABASE_TIMEOUT = "DATABASE_TIMEOUT"
DATABASE_CONFLICT = "DATABASE_CONFLICT"

# SQLSTATEs that mean the session is gone: connection exceptions (class 08), and the server ending
# it (administrator command, crash, starting up, idle-session timeout).
_SESSION_GONE = ("08", "57P01", "57P02", "57P03", "57P05")


class Pool(AsyncConnectionPool[Any]):
    """An `AsyncConnectionPool` that never hands out a connection the server already ended.

    A restart of Postgres (or `pg_terminate_backend`, or `idle_session_timeout`) ends every
    session; the pool's idle connections stay open on our side until used, and each one used
    failed a request (for minutes, until every one had been tried). A session the server ended has
    data waiting on its socket (the server's FATAL message, then end of file), while a healthy idle
    one has none; so `getconn` polls the socket (no round trip, microseconds) and only a readable
    one gets a real check (an empty query). One that fails is discarded (the pool opens a
    replacement) and the next is tried at once: after a restart the first request gets a fresh
    connection instead of an error. (psycopg_pool's own `check=` callback would add a round trip to
    every checkout and sleep a second after each failed check.)
    """

    async def getconn(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 (the base signature)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        failed = 0
        while True:
            try:
                conn = await super().getconn(max(deadline - time.monotonic(), 0.001))
            except PoolTimeout:
                raise PoolTimeout(f"couldn't get a connection after {wait:.2f} sec") from None
            try:
                if _idle_and_quiet(conn):
                    return conn
                await self.check_connection(conn)
                return conn
            except BaseException as exc:
                # Broken (now marked so by libpq): putconn discards it and opens a replacement.
                await self.putconn(conn)
                if not isinstance(exc, Exception):
                    raise
                failed += 1
                log.info("discarded a pooled connection the server had ended", extra={"pool": self.name})
            if failed > self.max_size:
                # More failures than the pool holds connections: fresh ones fail too (the server
                # is going away), so back off instead of spinning.
                await asyncio.sleep(
                    min(0.05 * 2 ** (failed - self.max_size), 1.0, max(deadline - time.monotonic(), 0))
                )


def _idle_and_quiet(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection's socket has nothing to read (so the server has not ended it)."""
    if conn.closed:
        return False
    poller = select.poll()  # not select.select: a busy process has descriptors above FD_SETSIZE
    poller.register(conn.pgconn.socket, select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


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
    rows dicts (``psycopg.rows.dict_row``). Extra `kwargs` go to each connection. A connection
    the server ended is replaced before a request gets it (`Pool`). Raises `Unavailable`
    (`DATABASE_UNAVAILABLE`, naming the server and libpq's reason) when the database cannot be
    reached within `open_timeout`.
    """
    options = f"-c statement_timeout={int(statement_timeout_ms)}"
    conn_kwargs: dict[str, Any] = {
        "autocommit": autocommit,
        "options": options,
        # A server that vanished without closing the connection (host down, network cut) is
        # noticed within about a minute instead of the kernel's two hours (TCP only; ignored on
        # Unix sockets).
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        **kwargs,
    }
    if dict_rows:
        conn_kwargs["row_factory"] = dict_row
    pool = Pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=acquire_timeout,
        kwargs=conn_kwargs,
        name=name,
        max_idle=300,
        max_lifetime=3600,
        # While the database is down each missing connection is retried with backoff (1 s, 2 s,
        # 4 s, ...) for this long, then given up and reopened on the next request: a short window
        # keeps the pool from sleeping through the database's return.
        reconnect_timeout=10,
        open=False,
    )
    try:
        await pool.open(wait=True, timeout=open_timeout)
    except PoolTimeout:
        # The pool only says "initialization incomplete": one direct attempt tells why.
        reason = "no connection within the timeout"
        try:
            probe_conn = await psycopg.AsyncConnection.connect(url, connect_timeout=5, **kwargs)
            await probe_conn.close()
        except psycopg.Error as exc:
            reason = str(exc).strip()
        raise Unavailable(
            f"cannot connect to the database {_describe(url)} within {open_timeout:g} s ({reason});"
            " check DATABASE_URL and that the database is running and reachable from this host",
            reason=DATABASE_UNAVAILABLE,
        ) from None
    return pool


def _describe(url: str) -> str:
    """`url` without its password, for messages."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "(unparsable DATABASE_URL)"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"{info.get('dbname', '')!s} at {host}:{port}".strip()


def database_error(exc: BaseException) -> AgentplaneError | None:
    """The domain error for a failure of the database itself, or None for anything else.

    Losing the server, a pool with no connection to give, or a statement cancelled by the
    statement timeout are conditions of the deployment, not bugs, and a later retry may succeed:
    UNAVAILABLE with reason `DATABASE_UNAVAILABLE` or `DATABASE_TIMEOUT` (never INTERNAL); a
    serialization failure or deadlock is ABORTED (`DATABASE_CONFLICT`). Other
    database errors (constraint violations nobody caught, syntax errors) stay bugs. Searches
    exception groups (a TaskGroup's failures).
    """
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = database_error(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, PoolTimeout):
        return Unavailable(
            "no database connection became available in time: the database is restarting or"
            " unreachable, or every connection is busy; retry in a few seconds (if it persists, an"
            " operator should check the database and this service's log)",
            reason=DATABASE_UNAVAILABLE,
        )
    if isinstance(exc, PoolClosed):
        return Unavailable(
            "this replica is shutting down and no longer uses its database; retry (another replica answers)",
            reason=DATABASE_UNAVAILABLE,
        )
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return Unavailable(
            "a database statement ran past the statement timeout and was cancelled (the database is"
            " overloaded or a lock is held); retry later",
            reason=DATABASE_TIMEOUT,
        )
    if isinstance(exc, psycopg.errors.TransactionRollback):
        return Aborted(
            "the request conflicted with a concurrent one (serialization failure or deadlock) and was"
            " rolled back; retry it",
            reason=DATABASE_CONFLICT,
        )
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        if not state or state.startswith(_SESSION_GONE):
            return Unavailable(
                "the connection to the database was lost while the request ran (the database"
                " restarted or became unreachable); the request may or may not have taken effect:"
                " check its result, then retry",
                reason=DATABASE_UNAVAILABLE,
                metadata={"outcome": "unknown"},
            )
        return Unavailable(
            f"the database could not run the request ({type(exc).__name__}, SQLSTATE {state});"
            " retry later (if it persists, an operator should check the database)",
            reason=DATABASE_UNAVAILABLE,
            metadata={"sqlstate": state},
        )
    return None


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
