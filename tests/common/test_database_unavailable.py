"""A database that is gone answers UNAVAILABLE with an actionable message, never INTERNAL.

Real Postgres throughout: sessions are ended with `pg_terminate_backend` (what a restart does) or
cut by closing a TCP proxy the test puts between a service and the database (a database that
stays unreachable), never by stopping the shared server.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import psycopg
import pytest
from agentplane.config.v1 import config_service_pb2, config_service_pb2_grpc
from prometheus_client import CollectorRegistry
from psycopg.conninfo import make_conninfo

from services.common import db
from services.common.client import create_channel
from services.common.embedded import free_port
from services.common.errors import Unavailable
from services.common.rpc_errors import error_info
from services.common.server import ServerHandle, create_server
from services.config import server as config_server
from tests.helpers import make_test_settings

SERVICE = "agentplane.test.v1.DatabaseTestService"


class DatabaseServicer:
    """A handler that uses a real pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.calls: collections.Counter[str] = collections.Counter()
        self.backends: asyncio.Queue[int] = asyncio.Queue()

    async def sleep(self, request: bytes, context: Any) -> bytes:
        """``pg_sleep(request)`` on a pooled connection, telling the test which backend runs it;
        ``b"timeout"`` runs into a 50 ms statement timeout instead."""
        self.calls["Sleep"] += 1
        async with self.pool.connection() as conn, conn.transaction():
            await self.backends.put(conn.info.backend_pid)
            if request == b"timeout":
                await conn.execute("SET LOCAL statement_timeout = 50")
                await conn.execute("SELECT pg_sleep(5)")
            else:
                await conn.execute("SELECT pg_sleep(%s)", [float(request)])
        return b"slept"

    def register(self, server: grpc.aio.Server) -> None:
        unary = grpc.unary_unary_rpc_method_handler
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Sleep": unary(self.sleep)}),)
        )


async def terminate(database_url: str, pid: int) -> None:
    """End one session the way a restart does, and wait until it has exited."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])
        row = await cur.fetchone()
    assert row is not None and row[0], f"session {pid} did not exit"


async def test_an_unreachable_database_is_named_with_the_reason() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        await db.create_pool(f"postgresql://agentplane@127.0.0.1:{port}/agentplane", open_timeout=1)
    assert caught.value.reason == db.DATABASE_UNAVAILABLE
    message = caught.value.message
    assert f"127.0.0.1:{port}" in message
    assert "refused" in message.lower()
    assert "DATABASE_URL" in message
    assert time.monotonic() - started < 15


@pytest.fixture
async def database_service(database_url: str, make_token: Callable[..., str]) -> AsyncIterator[Any]:
    pool = await db.create_pool(database_url, max_size=4)
    servicer = DatabaseServicer(pool)
    handle = create_server(make_test_settings(), "chat", servicer.register, [SERVICE])
    await handle.start()
    channel = create_channel(handle.address, token=make_token())
    try:
        yield servicer, channel
    finally:
        await channel.close()
        await handle.stop(0)
        await pool.close()


async def test_a_request_that_loses_its_connection_midway_is_unavailable_and_not_repeated(
    database_service: Any, database_url: str
) -> None:
    servicer, channel = database_service
    sleep = channel.unary_unary(f"/{SERVICE}/Sleep")
    call = asyncio.ensure_future(sleep(b"30", timeout=60))
    await terminate(database_url, await servicer.backends.get())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info == (db.DATABASE_UNAVAILABLE, {"outcome": "unknown"})
    assert "may or may not have taken effect" in (caught.value.details() or "")
    # It may have taken effect: the channel's retry policy must not run it again.
    assert servicer.calls["Sleep"] == 1

    # The broken connection was replaced: the next request runs.
    assert await sleep(b"0", timeout=30) == b"slept"

    # A statement cancelled by the statement timeout is a DATABASE_TIMEOUT, not a bug.
    with pytest.raises(grpc.aio.AioRpcError) as timed_out:
        await sleep(b"timeout", timeout=30)
    assert timed_out.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(timed_out.value) == (db.DATABASE_TIMEOUT, {})


class TcpProxy:
    """127.0.0.1:`port` forwarded to the Postgres server of `database_url`; `cut()` closes the port
    and every connection through it (a database that went away), `restore()` opens it again."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._upstream: tuple[str, int] = ("", 0)

    async def start(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._url) as conn:
            self._upstream = (conn.info.host, conn.info.port)
        await self.restore()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def url(self) -> str:
        return make_conninfo(self._url, host="127.0.0.1", port=str(self.port))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self._upstream
        if host.startswith("/"):  # a Unix socket directory (the embedded server)
            up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()


@pytest.mark.timeout(120)
async def test_config_answers_unavailable_while_its_database_is_unreachable_then_recovers(
    database_url: str, redis_url: str, make_token: Callable[..., str]
) -> None:
    proxy = TcpProxy(database_url)
    await proxy.start()
    settings = make_test_settings(database_url=proxy.url(), redis_url=redis_url)
    server = await config_server.build_server(
        settings, channel=f"test:config:{uuid.uuid4().hex}", registry=CollectorRegistry()
    )
    handle: ServerHandle = server.handle
    await handle.start()
    channel = create_channel(handle.address, token=make_token("admin", "admin"))
    stub = config_service_pb2_grpc.ConfigServiceStub(channel)
    try:
        await stub.ListProviders(config_service_pb2.ListProvidersRequest(), timeout=30)

        await proxy.cut()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListProviders(config_service_pb2.ListProvidersRequest(), timeout=60)
        waited = time.monotonic() - started
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value.details()
        info = error_info(caught.value)
        assert info is not None and info[0] == db.DATABASE_UNAVAILABLE
        assert "retry" in (caught.value.details() or "")
        # One wait for the pool (10 s), not one per attempt of the channel's retry policy.
        assert waited < 25

        await proxy.restore()
        deadline = time.monotonic() + 30
        while True:
            try:
                await stub.ListProviders(config_service_pb2.ListProvidersRequest(), timeout=30)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() < deadline, "config did not recover after the database returned"
    finally:
        await channel.close()
        await server.stop(0)
        await proxy.cut()
