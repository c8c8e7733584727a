"""Numbered SQL migrations per component, applied by `agentplane migrate`.

Layout: ``services/<component>/migrations/NNNN_name.sql`` (e.g. ``0001_init.sql``). Every
file runs in its own transaction, all under one `pg_advisory_lock`, and is recorded in
``schema_migrations (component, version, name, checksum, applied_at)``. Running again is a
no-op; concurrent runs wait for the lock and then find nothing left to do. Editing an
applied file is an error (checksum mismatch): add a new migration instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from services.common.errors import FailedPrecondition

log = logging.getLogger(__name__)

SERVICES_ROOT = Path(__file__).resolve().parent.parent
ADVISORY_LOCK_KEY = 0x6167_656E_7470_6C61 & 0x7FFF_FFFF_FFFF_FFFF  # "agentpla"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True)
class Migration:
    """One SQL file."""

    component: str
    version: int
    name: str
    path: Path
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def __str__(self) -> str:
        return f"{self.component}/{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class AppliedMigration:
    """A migration that this run applied."""

    component: str
    version: int
    name: str
    checksum: str
    applied_at: dt.datetime


def discover(root: Path = SERVICES_ROOT) -> list[Migration]:
    """Every migration under ``root/*/migrations/``, ordered by component then version."""
    found: list[Migration] = []
    for directory in sorted(root.glob("*/migrations")):
        if not directory.is_dir():
            continue
        component = directory.parent.name
        seen: dict[int, Path] = {}
        for path in sorted(directory.glob("*.sql")):
            match = _FILE_RE.match(path.name)
            if not match:
                raise FailedPrecondition(
                    f"migration file name must be NNNN_name.sql: {path}", reason="BAD_MIGRATION"
                )
            version = int(match.group(1))
            if version in seen:
                raise FailedPrecondition(
                    f"duplicate migration version {version} in {directory}", reason="BAD_MIGRATION"
                )
            seen[version] = path
            found.append(Migration(component, version, match.group(2), path, path.read_text()))
    return found


async def migrate(database_url: str, root: Path = SERVICES_ROOT) -> list[AppliedMigration]:
    """Apply every pending migration; returns the ones this call applied (in order)."""
    pending = discover(root)
    applied: list[AppliedMigration] = []
    async with await psycopg.AsyncConnection.connect(
        database_url, autocommit=True, connect_timeout=10
    ) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            await conn.execute(_CREATE_TABLE)
            cur = await conn.execute("SELECT component, version, checksum FROM schema_migrations")
            done = {(c, v): s for c, v, s in await cur.fetchall()}
            for m in pending:
                recorded = done.get((m.component, m.version))
                if recorded is not None:
                    if recorded != m.checksum:
                        raise FailedPrecondition(
                            f"migration {m} was changed after it was applied; add a new migration instead",
                            reason="MIGRATION_CHECKSUM_MISMATCH",
                        )
                    continue
                log.info("applying migration %s", m)
                async with conn.transaction():
                    await conn.execute(m.sql.encode())  # type: ignore[arg-type]
                    cur = await conn.execute(
                        "INSERT INTO schema_migrations (component, version, name, checksum) "
                        "VALUES (%s, %s, %s, %s) RETURNING applied_at",
                        (m.component, m.version, m.name, m.checksum),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                applied.append(AppliedMigration(m.component, m.version, m.name, m.checksum, row[0]))
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    return applied
