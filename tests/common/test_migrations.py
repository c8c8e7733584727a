"""Migrations: ordering, idempotence, concurrency, and checksum protection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from services.common.errors import FailedPrecondition
from services.common.migrations import discover, migrate


def write_migrations(root: Path) -> None:
    (root / "alpha" / "migrations").mkdir(parents=True)
    (root / "beta" / "migrations").mkdir(parents=True)
    (root / "alpha" / "migrations" / "0001_things.sql").write_text(
        "CREATE TABLE alpha_things (id int PRIMARY KEY);\nCREATE TABLE alpha_log (msg text);\n"
        "INSERT INTO alpha_log VALUES ('0001');\n"
    )
    (root / "alpha" / "migrations" / "0002_more.sql").write_text(
        "ALTER TABLE alpha_things ADD COLUMN name text;\nINSERT INTO alpha_log VALUES ('0002');\n"
    )
    (root / "beta" / "migrations" / "0001_init.sql").write_text("CREATE TABLE beta_items (id int);\n")


def test_discover_orders_by_component_and_version(tmp_path: Path) -> None:
    write_migrations(tmp_path)
    assert [str(m) for m in discover(tmp_path)] == ["alpha/0001_things", "alpha/0002_more", "beta/0001_init"]


async def test_concurrent_runs_apply_each_migration_once(tmp_path: Path, empty_database_url: str) -> None:
    write_migrations(tmp_path)
    results = await asyncio.gather(*(migrate(empty_database_url, tmp_path) for _ in range(3)))
    applied = sorted((m.component, m.version) for r in results for m in r)
    assert applied == [("alpha", 1), ("alpha", 2), ("beta", 1)]
    assert await migrate(empty_database_url, tmp_path) == []
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        log = await (await conn.execute("SELECT msg FROM alpha_log ORDER BY msg")).fetchall()
        assert [r[0] for r in log] == ["0001", "0002"]
        rows = await (await conn.execute("SELECT component, version, name FROM schema_migrations")).fetchall()
        assert sorted(rows) == [("alpha", 1, "things"), ("alpha", 2, "more"), ("beta", 1, "init")]


async def test_failed_migration_rolls_back_and_edits_are_refused(
    tmp_path: Path, empty_database_url: str
) -> None:
    write_migrations(tmp_path)
    bad = tmp_path / "beta" / "migrations" / "0002_bad.sql"
    bad.write_text("CREATE TABLE beta_half (id int);\nSELECT no_such_function();\n")
    with pytest.raises(psycopg.Error):
        await migrate(empty_database_url, tmp_path)
    bad.unlink()
    assert [(m.component, m.version) for m in await migrate(empty_database_url, tmp_path)] == []
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        half = await (await conn.execute("SELECT to_regclass('beta_half')")).fetchone()
        assert half == (None,)
    (tmp_path / "alpha" / "migrations" / "0001_things.sql").write_text("SELECT 1;\n")
    with pytest.raises(FailedPrecondition) as info:
        await migrate(empty_database_url, tmp_path)
    assert info.value.reason == "MIGRATION_CHECKSUM_MISMATCH"


async def test_database_fixture_is_migrated_and_isolated(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE only_here (id int)")
        row = await (await conn.execute("SELECT to_regclass('schema_migrations')")).fetchone()
        assert row is not None and row[0] is not None
