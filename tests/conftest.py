"""Shared test fixtures. Build on these; do not start your own databases.

Session-wide:
- ``pg_admin_url``: URL of a Postgres server's admin database. From
  ``AGENTPLANE_TEST_DATABASE_URL`` when set (the user must be allowed to CREATE DATABASE),
  else an embedded Postgres started once for the session under a temp directory.
- ``template_database``: a database migrated once per session with every
  ``services/*/migrations`` file; per-test databases are copies of it.
- ``redis_server_url``: ``AGENTPLANE_TEST_REDIS_URL`` when set, else an embedded Redis.

Per test:
- ``database_url``: a fresh, already-migrated database of its own (``CREATE DATABASE ...
  TEMPLATE``), dropped after the test. Cheap: use it freely.
- ``redis_url``: a Redis db index of its own (1..15, rotating), flushed before the test.
  Pub/sub channels are server-wide: include something unique if a test depends on that.
- ``keys_dir`` / ``keys``: the test deployment's keys; ``secret``: the issuer key's material.
- ``make_token(subject="alice", role="user", ttl=3600)``: mint a token; a service token is
  ``make_token("service:chat", "service")``; also ``user_token``, ``admin_token``.
- ``settings``: `Settings` with the per-test database and Redis, the test secret, every
  service on 127.0.0.1 port 0, metrics endpoints off.

Helpers (tests/helpers.py): ``serve_in_process(build, settings, token=...)`` starts a
service's real server in-process on port 0 and yields ``RunningService(handle, channel)``;
``running_server(handle, token=...)`` does the same for a handle you built yourself;
``make_test_settings(...)`` builds settings by hand.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from services.common import auth
from services.common.db import with_database
from services.common.embedded import start_postgres, start_redis
from services.common.keys import Keys
from services.common.migrations import migrate
from services.common.settings import Settings
from tests.helpers import (
    deployment_keys,
    deployment_keys_dir,
    issuer_key_material,
    kill_agents,
    make_test_settings,
)

TEMPLATE_DB = "agentplane_test_template"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """Admin URL of the session's Postgres server (external or embedded)."""
    external = os.environ.get("AGENTPLANE_TEST_DATABASE_URL")
    if external:
        yield external
        return
    tmp = tempfile.mkdtemp(prefix="agentplane-test-pg-")
    os.chmod(tmp, 0o755)  # the embedded server runs as its own system user when we are root
    server = start_postgres(os.path.join(tmp, "data"), delete=True, dbname="postgres")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def template_database(pg_admin_url: str) -> str:
    """Name of a database with every migration applied, rebuilt once per session."""
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')  # type: ignore[arg-type]
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')  # type: ignore[arg-type]
    await migrate(with_database(pg_admin_url, TEMPLATE_DB))
    return TEMPLATE_DB


@pytest.fixture
async def database_url(pg_admin_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh migrated database for this test only."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(pg_admin_url, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')  # type: ignore[arg-type]
    try:
        yield with_database(pg_admin_url, name)
    finally:
        async with await psycopg.AsyncConnection.connect(pg_admin_url, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@pytest.fixture
async def empty_database_url(pg_admin_url: str) -> AsyncIterator[str]:
    """A fresh database with no migrations applied (for migration tests)."""
    name = f"e_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(pg_admin_url, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        yield with_database(pg_admin_url, name)
    finally:
        async with await psycopg.AsyncConnection.connect(pg_admin_url, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """URL (db 0) of the session's Redis server (external or embedded)."""
    external = os.environ.get("AGENTPLANE_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


_redis_dbs = itertools.cycle(range(1, 16))


@pytest.fixture
async def redis_url(redis_server_url: str) -> str:
    """A Redis URL on a db index of its own, flushed before the test."""
    url = with_database(redis_server_url, str(next(_redis_dbs)))
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return url


@pytest.fixture(scope="session")
def keys_dir() -> str:
    """The test deployment's key directory (`AGENTPLANE_KEYS_DIR` for processes tests start)."""
    return deployment_keys_dir()


@pytest.fixture(scope="session")
def keys(keys_dir: str) -> Keys:
    """Every key of the test deployment: tests mint tokens for any user and any service."""
    return deployment_keys()


@pytest.fixture(scope="session")
def secret() -> str:
    """The test deployment's most valuable secret (the user issuer's private key), to look for."""
    return issuer_key_material()


@pytest.fixture(scope="session")
def make_token(keys: Keys) -> Callable[..., str]:
    """``make_token(subject="alice", role="user", ttl=3600) -> str`` (each signed by the key that may)."""

    def make(subject: str = "alice", role: auth.Role | str = auth.Role.USER, ttl: float = 3600) -> str:
        return auth.mint_token(keys, subject, role, ttl)

    return make


@pytest.fixture
def user_token(make_token: Callable[..., str]) -> str:
    """A token for user ``alice``."""
    return make_token("alice", auth.Role.USER)


@pytest.fixture
def admin_token(make_token: Callable[..., str]) -> str:
    """A token for admin user ``admin``."""
    return make_token("admin", auth.Role.ADMIN)


@pytest.fixture
def settings(database_url: str, redis_url: str, keys_dir: str) -> Settings:
    """Test settings wired to this test's database and Redis; all ports 0."""
    return make_test_settings(database_url=database_url, redis_url=redis_url, keys_dir=keys_dir)


@pytest.fixture
def workspaces_dir(tmp_path: Any) -> Iterator[str]:
    """A fresh workspaces dir; every workspace agent started there is killed at teardown."""
    path = str(tmp_path / "workspaces")
    os.makedirs(path)
    # The sandboxed workspace user must reach the directory (pytest's tmp dirs are 0700).
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o755)
    yield path
    kill_agents(path)
