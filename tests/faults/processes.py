"""Services as real child processes (`agentplane serve NAME`), so a test can SIGKILL them.

A chat replica or a toolexec killed in-process would take the test with it, and cancelling its
tasks is not what a crash does: a SIGKILLed process writes nothing more, releases no lease and
closes no stream; Postgres and its peers notice only that its sockets closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.client import wait_for_health
from services.common.embedded import free_port
from services.common.settings import Settings
from tests.helpers import deployment_keys_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
# Short leases, renewals, polls and sweeps: a killed replica's chats are swept (its liveness lock
# is gone with its session) and claimed elsewhere within about a second.
FAST_CHAT_ENV = {
    "AGENTPLANE_CHAT_MAX_CONCURRENT": "8",
    "AGENTPLANE_CHAT_LEASE_SECONDS": "3",
    "AGENTPLANE_CHAT_RENEW_INTERVAL_SECONDS": "0.5",
    "AGENTPLANE_CHAT_POLL_INTERVAL_SECONDS": "0.5",
    "AGENTPLANE_CHAT_SWEEP_INTERVAL_SECONDS": "0.5",
    "AGENTPLANE_CHAT_DELTA_FLUSH_MS": "20",
}


@dataclass
class ServiceProcess:
    """One `agentplane serve NAME` child process listening on `address`."""

    name: str
    service: str
    address: str
    port: int
    log_path: Path
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    killed: bool = field(default=False)
    # Serving: started, healthy, and not killed since.
    ready: bool = field(default=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, within: float = 60.0) -> None:
        """Spawn the process and wait until its health check answers SERVING."""
        # The child's output goes to a local file (opened in microseconds), closed here once handed over.
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.cli.main",
                "serve",
                self.service,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        self.killed = False
        try:
            await wait_for_health(self.address, within=within, alive=lambda: self.alive)
        except BaseException:
            await self.kill()
            raise
        self.ready = True

    async def kill(self) -> None:
        """SIGKILL it and reap it (a crash: nothing of it runs any more when this returns)."""
        self.ready = False
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.killed = True
        await asyncio.wait_for(self.proc.wait(), 10)

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log (for failure reports)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def service_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a service process wired like `settings` (database, Redis, keys, peers)."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": settings.require_database_url(),
            "REDIS_URL": settings.redis_url or "",
            "AGENTPLANE_KEYS_DIR": deployment_keys_dir(),
            "AGENTPLANE_HOST": "127.0.0.1",
            "AGENTPLANE_LOG_LEVEL": "INFO",
            "AGENTPLANE_SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    for peer in ("config", "inference", "toolexec", "chat"):
        env[f"AGENTPLANE_{peer.upper()}_ADDR"] = settings.address(peer)
        env[f"AGENTPLANE_{peer.upper()}_METRICS_PORT"] = "0"
    env.update(extra or {})
    return env


def service_process(
    settings: Settings,
    service: str,
    name: str,
    log_dir: Path,
    *,
    port: int | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """A (not yet started) process of `service` on `port` (a free one unless given)."""
    port = port or free_port()
    env = service_env(settings, extra_env)
    env[f"AGENTPLANE_{service.upper()}_PORT"] = str(port)
    return ServiceProcess(
        name=name,
        service=service,
        address=f"127.0.0.1:{port}",
        port=port,
        log_path=log_dir / f"{name}.log",
        env=env,
    )


class ChatReplicas:
    """Chat replicas as child processes (each runs workers and serves the API); kill and replace them."""

    def __init__(self, settings: Settings, log_dir: Path, extra_env: Mapping[str, str] | None = None) -> None:
        self._settings = settings
        self._log_dir = log_dir
        self._extra = {**FAST_CHAT_ENV, **(extra_env or {})}
        self._count = 0
        self.all: list[ServiceProcess] = []
        self.kills = 0

    @property
    def live(self) -> list[ServiceProcess]:
        """Replicas started and not killed (including ones still starting)."""
        return [r for r in self.all if r.alive]

    @property
    def ready(self) -> list[ServiceProcess]:
        """Replicas serving now."""
        return [r for r in self.all if r.ready and r.alive]

    async def spawn(self) -> ServiceProcess:
        """Start one more replica and wait until it serves."""
        self._count += 1
        name = f"replica-{self._count}"
        replica = service_process(
            self._settings,
            "chat",
            name,
            self._log_dir,
            extra_env={**self._extra, "AGENTPLANE_CHAT_WORKER_ID": name},
        )
        self.all.append(replica)
        await replica.start()
        return replica

    async def kill(self, replica: ServiceProcess) -> None:
        """SIGKILL one replica."""
        await replica.kill()
        self.kills += 1

    def named(self, worker_id: str) -> ServiceProcess | None:
        return next((r for r in self.all if r.name == worker_id), None)

    async def close(self) -> None:
        for replica in self.all:
            await replica.kill()
