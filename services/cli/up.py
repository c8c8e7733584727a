"""`agentplane up`: run the whole product on this machine.

Starts an embedded Postgres / Redis when DATABASE_URL / REDIS_URL are unset (data under
AGENTPLANE_DATA_DIR), applies migrations, runs every service as a child process
(`agentplane serve NAME`), prints the addresses and an admin token, and stops everything
on Ctrl-C / SIGTERM or when a service dies. On a deployment without providers it creates
them from OPENAI_API_KEY / ANTHROPIC_API_KEY, or, with neither, runs the LLM simulator as
the provider of a default model so the product works offline (`--simulator`).

One `up` per data directory: it holds an flock on ``<data dir>/up.lock`` (`data_dir_lock`) for its
whole life, and a second one names the holder's pid and exits 1 before touching anything. Progress
goes to stderr as it starts (stdout keeps the banner, or the JSON of ``--output json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from services.cli import bootstrap, data_dir_lock
from services.cli.output import add_output_argument, emit
from services.common import auth, embedded, keys
from services.common.client import wait_for_health
from services.common.embedded import EmbeddedPostgres, EmbeddedRedis, start_postgres, start_redis
from services.common.migrations import migrate
from services.common.settings import SERVICE_NAMES, Settings

PROVIDER_KEY_VARIABLES = frozenset({"OPENAI_API_KEY", "ANTHROPIC_API_KEY"})
KEY_VARIABLES = frozenset({"AGENTPLANE_KEYS_DIR", "AGENTPLANE_JWKS", "AGENTPLANE_ISSUER_KEY_FILE"})


def register(subparsers: Any) -> None:
    """Add the `up` command."""
    parser = subparsers.add_parser("up", help="run everything locally (embedded Postgres/Redis if no URLs)")
    parser.add_argument("--services", nargs="+", choices=SERVICE_NAMES, default=list(SERVICE_NAMES))
    parser.add_argument("--admin-user", default="admin", help="user id of the printed admin token")
    parser.add_argument(
        "--simulator",
        choices=["auto", "always", "never"],
        default="auto",
        help="run the LLM simulator (auto: when neither OPENAI_API_KEY nor ANTHROPIC_API_KEY is set)",
    )
    parser.add_argument("--simulator-port", type=int, default=8800)
    parser.add_argument(
        "--simulator-script",
        metavar="FILE",
        help="a JSON script the simulator plays from the start (docs/simulator.md)",
    )
    add_output_argument(parser)
    parser.set_defaults(func=run)


def local_encryption_key(data_dir: Path) -> str:
    """The config service's API-key encryption key kept in ``<data_dir>/encryption-key`` (created on
    first use, mode 0600), so stored provider keys stay readable across restarts. The file holds an
    ``AGENTPLANE_ENCRYPTION_KEY`` value: to rotate, write ``NEW,OLD`` into it, restart, run
    ``agentplane admin rotate-encryption-key``, then leave only ``NEW``."""
    path = data_dir / "encryption-key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def run(args: argparse.Namespace) -> int | Coroutine[Any, Any, int]:
    """Lock and prepare the data directory and environment; the returned coroutine runs everything.

    Another `up` on the same data directory: say which process it is and return 1 at once, having
    written nothing (no keys, no encryption key, no Postgres or Redis started or stopped)."""
    env = dict(os.environ)
    if args.simulator_script:
        from services.simulator.script import Script, ScriptError

        try:
            Script.load(args.simulator_script)
        except (OSError, ScriptError) as exc:
            print(f"agentplane up: --simulator-script {args.simulator_script}: {exc}", file=sys.stderr)
            return 2
        args.simulator_script = str(Path(args.simulator_script).resolve())
    early = Settings.from_env(env)
    # Before anything is written: without the `local` extra there is no embedded Postgres or Redis.
    missing = embedded.missing_local_extra(postgres=not early.database_url, redis=not early.redis_url)
    if missing:
        print(f"agentplane up: {missing}", file=sys.stderr)
        return 2
    data_dir = Path(early.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = data_dir_lock.acquire(data_dir)
    except data_dir_lock.DataDirInUse as exc:
        print(f"agentplane up: {exc}", file=sys.stderr)
        return 1
    try:
        if not (env.get("AGENTPLANE_JWKS") or env.get("AGENTPLANE_KEYS_DIR")):
            # Every key under the data directory: the user issuer key (for the admin token and every
            # CLI command) and one signing key per service.
            keys.init_dir(data_dir / "keys", SERVICE_NAMES)
        if "AGENTPLANE_ENCRYPTION_KEY" not in env:
            env["AGENTPLANE_ENCRYPTION_KEY"] = local_encryption_key(data_dir)
        env.setdefault("AGENTPLANE_HOST", "127.0.0.1")
        env["AGENTPLANE_DATA_DIR"] = str(data_dir)
        _choose_sandbox(env)
    except BaseException:
        lock.release()
        raise
    return _run(args, env, data_dir, lock)


class Progress:
    """What `up` is doing, one line each on stderr with the time since it began, so the first
    start (initdb, every service's imports) is not a silent half-minute."""

    def __init__(self) -> None:
        self._began = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self._began
        print(f"agentplane up [{elapsed:5.1f}s] {message}", file=sys.stderr, flush=True)


def _choose_sandbox(env: dict[str, str]) -> None:
    """A trial on one's own machine runs without bubblewrap, but says loudly what that means."""
    from services.toolexec import sandbox

    try:
        chosen = sandbox.choose(env.get("AGENTPLANE_WORKSPACE_SANDBOX", "auto"))
    except sandbox.SandboxUnavailable as exc:
        print(f"WARNING: {exc}", file=sys.stderr)
        chosen = sandbox.choose("none")
        env["AGENTPLANE_WORKSPACE_SANDBOX"] = "none"
    if not chosen.isolated:
        print(
            f"WARNING: workspace sandbox {chosen.mode!r}: {sandbox.NOT_ISOLATED}. To isolate them, "
            f"{sandbox.INSTALL_HINT}.",
            file=sys.stderr,
        )


async def _run(
    args: argparse.Namespace, env: dict[str, str], data_dir: Path, lock: data_dir_lock.DataDirLock
) -> int:
    """Start dependencies and services, then wait for a signal or a dead child."""
    settings = Settings.from_env(env)
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    children: dict[str, asyncio.subprocess.Process] = {}
    progress = Progress()
    try:
        if not settings.database_url:
            pgdata = data_dir / "postgres"
            first = "" if (pgdata / "PG_VERSION").exists() else " (first start: initialising it)"
            progress(f"starting embedded Postgres in {pgdata}{first}")
            postgres = await asyncio.to_thread(start_postgres, pgdata)
            env["DATABASE_URL"] = postgres.url
        if not settings.redis_url:
            progress("starting embedded Redis")
            redis = await asyncio.to_thread(start_redis, log_file=str(data_dir / "redis.log"))
            env["REDIS_URL"] = redis.url
        settings = Settings.from_env(env)
        progress("applying database migrations")
        await migrate(settings.require_database_url())
        simulator_url = None
        if _want_simulator(args, env):
            simulator_url = f"http://127.0.0.1:{args.simulator_port}"
            progress(f"starting the LLM simulator on {simulator_url}")
            script = ["--script", args.simulator_script] if args.simulator_script else []
            children["simulator"] = await asyncio.create_subprocess_exec(
                *_agentplane("simulator", "--port", str(args.simulator_port), *script),
                env=service_environment(env),
                stdout=CHILD_STDOUT,
            )
        addresses = {n: settings.address(n) for n in args.services}
        for name in args.services:
            progress(f"starting {name} on {addresses[name]}")
            children[name] = await asyncio.create_subprocess_exec(
                *_agentplane("serve", name), env=service_environment(env, name), stdout=CHILD_STDOUT
            )
        ttl = min(7 * 24 * 3600, settings.max_token_lifetime_seconds)
        token = auth.mint_token(settings.keys, args.admin_user, auth.Role.ADMIN, ttl)
        for name in args.services:
            progress(f"waiting for {name} to answer its health check")
            proc = children[name]
            await wait_for_health(addresses[name], alive=lambda p=proc: p.returncode is None)  # type: ignore[misc]
        progress("every service is serving")
        seeded: list[str] = []
        if "config" in args.services and not await bootstrap.has_providers(addresses["config"], token):
            plans = bootstrap.plan(env, simulator_url)
            progress(f"seeding the first providers: {', '.join(p.label for p in plans) or 'none to create'}")
            seeded = await bootstrap.seed(addresses["config"], token, plans)
        info = {
            "services": addresses,
            "database_url": settings.database_url,
            "redis_url": settings.redis_url,
            "admin_token": token,
            "simulator_url": simulator_url,
            "seeded": seeded,
        }
        lines = [f"{n:<10} {a}" for n, a in addresses.items()]
        if simulator_url:
            lines.append(f"simulator  {simulator_url} (offline LLM; set OPENAI_API_KEY for a real one)")
        lines += [f"created {item}" for item in seeded]
        text = "\n".join([*lines, f"admin token: {token}", "Ctrl-C to stop"])
        emit(args, info, text)
        sys.stdout.flush()
        return await _wait(children)
    finally:
        if children:
            progress("stopping the services")
        await _stop_children(children, settings.shutdown_grace_seconds + 5)
        # Workspace agents outlive a toolexec restart by design; `up` owns the whole machine's
        # deployment, so they stop with it (their workspaces stay; agents start again on use).
        from services.toolexec.local_driver import kill_agents

        workspaces = env.get("AGENTPLANE_WORKSPACES_DIR") or str(data_dir / "workspaces")
        await asyncio.to_thread(kill_agents, workspaces)
        if redis is not None:
            redis.stop()
        if postgres is not None:
            progress("stopping embedded Postgres")
            await asyncio.to_thread(postgres.stop)
        # Last: the next `up` on this directory may start only once everything here has stopped.
        lock.release()


def service_environment(env: dict[str, str], name: str = "") -> dict[str, str]:
    """What service `name`'s process gets: `up`'s environment without the provider keys, which only
    the bootstrap reads (they reach inference encrypted, through config) — no service needs them —
    and without the encryption key except for config, the only service that holds it."""
    out = {
        k: v
        for k, v in env.items()
        if k not in PROVIDER_KEY_VARIABLES and (k != "AGENTPLANE_ENCRYPTION_KEY" or name == "config")
    }
    if name and name != "simulator":
        # The public key set and this service's own key, nothing else (no other service's key,
        # no user issuer key), whatever `up` itself was given.
        for key in list(out):
            if key in KEY_VARIABLES or key.endswith("_SIGNING_KEY_FILE"):
                del out[key]
        held = Settings.from_env(env).keys
        out["AGENTPLANE_JWKS"] = held.jwks_source
        own = held.signing_file(name)
        if own:
            out[f"AGENTPLANE_{name.upper()}_SIGNING_KEY_FILE"] = own
    return out


# The children write to up's stderr, stdout included (the simulator announces itself there): up's
# stdout carries the banner (or the JSON of --output json) alone, the services' JSON logs go to stderr.
CHILD_STDOUT = 2


def _agentplane(*argv: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", *argv]


def _want_simulator(args: argparse.Namespace, env: dict[str, str]) -> bool:
    if args.simulator == "auto":
        return not (env.get("OPENAI_API_KEY") or env.get("ANTHROPIC_API_KEY"))
    return bool(args.simulator == "always")


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
