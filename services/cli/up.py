"""`agentplane up`: run the whole product on this machine.

Starts an embedded Postgres / Redis when DATABASE_URL / REDIS_URL are unset (data under
AGENTPLANE_DATA_DIR), applies migrations, runs every service as a child process
(`agentplane serve NAME`), prints the addresses and an admin token, and stops everything
on Ctrl-C / SIGTERM or when a service dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from services.cli.output import add_output_argument, emit
from services.common import auth
from services.common.embedded import EmbeddedPostgres, EmbeddedRedis, start_postgres, start_redis
from services.common.migrations import migrate
from services.common.settings import SERVICE_NAMES, Settings


def register(subparsers: Any) -> None:
    """Add the `up` command."""
    parser = subparsers.add_parser("up", help="run everything locally (embedded Postgres/Redis if no URLs)")
    parser.add_argument("--services", nargs="+", choices=SERVICE_NAMES, default=list(SERVICE_NAMES))
    parser.add_argument("--admin-user", default="admin", help="user id of the printed admin token")
    add_output_argument(parser)
    parser.set_defaults(func=run)


def local_secret(data_dir: Path) -> str:
    """The secret kept in ``<data_dir>/secret`` (created on first use), so tokens survive restarts."""
    path = data_dir / "secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def run(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    """Prepare the data directory and environment; the returned coroutine runs everything."""
    env = dict(os.environ)
    data_dir = Path(Settings.from_env(env).data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if "AGENTPLANE_SECRET" not in env:
        env["AGENTPLANE_SECRET"] = local_secret(data_dir)
    env.setdefault("AGENTPLANE_HOST", "127.0.0.1")
    env["AGENTPLANE_DATA_DIR"] = str(data_dir)
    return _run(args, env, data_dir)


async def _run(args: argparse.Namespace, env: dict[str, str], data_dir: Path) -> int:
    """Start dependencies and services, then wait for a signal or a dead child."""
    settings = Settings.from_env(env)
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    children: dict[str, asyncio.subprocess.Process] = {}
    try:
        if not settings.database_url:
            postgres = await asyncio.to_thread(start_postgres, data_dir / "postgres")
            env["DATABASE_URL"] = postgres.url
        if not settings.redis_url:
            redis = await asyncio.to_thread(start_redis, log_file=str(data_dir / "redis.log"))
            env["REDIS_URL"] = redis.url
        settings = Settings.from_env(env)
        await migrate(settings.require_database_url())
        for name in args.services:
            children[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli.main", "serve", name, env=env
            )
        token = auth.mint_token(settings.secret, args.admin_user, auth.Role.ADMIN, 7 * 24 * 3600)
        addresses = {n: settings.address(n) for n in args.services}
        info = {
            "services": addresses,
            "database_url": settings.database_url,
            "redis_url": settings.redis_url,
            "admin_token": token,
        }
        lines = [f"{n:<10} {a}" for n, a in addresses.items()]
        text = "\n".join([*lines, f"admin token: {token}", "Ctrl-C to stop"])
        emit(args, info, text)
        sys.stdout.flush()
        return await _wait(children)
    finally:
        await _stop_children(children, settings.shutdown_grace_seconds + 5)
        if redis is not None:
            redis.stop()
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)


async def _wait(children: dict[str, asyncio.subprocess.Process]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = {asyncio.create_task(p.wait()): name for name, p in children.items()}
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
    for task in [stopper, *waits]:
        task.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    if stopper in done:
        return 0
    dead = [waits[t] for t in done if t in waits]
    print(f"agentplane up: service {', '.join(dead)} exited; stopping", file=sys.stderr)
    return 1


async def _stop_children(children: dict[str, asyncio.subprocess.Process], grace: float) -> None:
    for proc in children.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in children.values():
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
