"""Fixtures of the hostile-input suites: one seeded deployment per test module.

A module's tests share a deployment (`world`) on a database and Redis db of the module's own, so
hundreds of generated requests do not each pay for starting four servers. Tests that need a fresh
deployment use the per-test fixtures of tests/conftest.py instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import psycopg
import pytest
import redis.asyncio as aioredis

from services.common.db import with_database
from services.common.settings import Settings
from tests.helpers import kill_agents, make_test_settings
from tests.hostile.world import World, start_world

# Redis db index of the module deployments: tests/conftest.py hands out 1..15 per test.
MODULE_REDIS_DB = "0"


@pytest.fixture(scope="module")
async def module_database_url(pg_admin_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh migrated database for this test module."""
    name = f"h_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(pg_admin_url, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')  # type: ignore[arg-type]
    try:
        yield with_database(pg_admin_url, name)
    finally:
        async with await psycopg.AsyncConnection.connect(pg_admin_url, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def module_redis_url(redis_server_url: str) -> str:
    """A Redis db for this test module, flushed first."""
    url = with_database(redis_server_url, MODULE_REDIS_DB)
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return url


@pytest.fixture(scope="module")
def module_workspaces_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A workspaces directory for this module; every agent started there is killed at the end."""
    root = tmp_path_factory.mktemp("hostile")
    path = str(root / "workspaces")
    os.makedirs(path)
    os.chmod(root, 0o755)  # the sandboxed workspace user must reach it
    os.chmod(path, 0o755)
    yield path
    kill_agents(path)


@pytest.fixture(scope="module")
def module_settings(module_database_url: str, module_redis_url: str, keys_dir: str) -> Settings:
    """Test settings on the module's database and Redis."""
    return make_test_settings(database_url=module_database_url, redis_url=module_redis_url, keys_dir=keys_dir)


@pytest.fixture(scope="module")
async def world(
    module_settings: Settings, make_token: Callable[..., str], module_workspaces_dir: str
) -> AsyncIterator[World]:
    """The module's seeded deployment (external workspaces)."""
    w = await start_world(module_settings, make_token, module_workspaces_dir)
    try:
        yield w
    finally:
        await w.stop()
