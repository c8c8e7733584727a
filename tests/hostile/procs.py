"""The four services as separate processes (`agentplane serve NAME`), as a deployment runs them.

Each process gets what `agentplane up` gives it (`up.service_environment`: its own signing key,
the encryption key for config only, no provider keys), logs JSON lines at DEBUG to a file of its
own, and serves metrics on a port of its own. Secrets are redacted per process, exactly as in
production: a test reading these logs sees what an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from services.cli.up import service_environment
from services.common.client import wait_for_health
from services.common.embedded import free_port
from tests.helpers import TEST_ENCRYPTION_KEY

SERVICES = ("config", "inference", "toolexec", "chat")
STOP_GRACE_SECONDS = 10.0


@dataclass
class ProcessStack:
    """Running service processes: addresses, metrics ports, log files, pids."""

    addresses: dict[str, str]
    metrics_ports: dict[str, int]
    logs: dict[str, Path]
    workspaces_dir: str
    data_dir: str
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def log_text(self) -> dict[str, str]:
        """Every service's log so far."""
        return {name: path.read_text(errors="replace") for name, path in self.logs.items()}

    async def stop(self) -> None:
        """SIGTERM every process, then SIGKILL what is left after the grace."""
        for proc in self.processes.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def _base_environment(
    database_url: str, redis_url: str, keys_dir: str, root: Path, extra: dict[str, str]
) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTPLANE_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "AGENTPLANE_KEYS_DIR": keys_dir,
            "AGENTPLANE_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY,
            "AGENTPLANE_HOST": "127.0.0.1",
            "AGENTPLANE_LOG_LEVEL": "DEBUG",
            "AGENTPLANE_DATA_DIR": str(root / "data"),
            "AGENTPLANE_WORKSPACES_DIR": str(root / "workspaces"),
            "AGENTPLANE_SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    addresses: dict[str, str] = {}
    metrics: dict[str, int] = {}
    for name in SERVICES:
        port, metrics_port = free_port(), free_port()
        addresses[name] = f"127.0.0.1:{port}"
        metrics[name] = metrics_port
        env[f"AGENTPLANE_{name.upper()}_PORT"] = str(port)
        env[f"AGENTPLANE_{name.upper()}_ADDR"] = addresses[name]
        env[f"AGENTPLANE_{name.upper()}_METRICS_PORT"] = str(metrics_port)
    env.update(extra)
    return env, addresses, metrics


async def start_processes(
    database_url: str, redis_url: str, keys_dir: str, root: Path, extra: dict[str, str] | None = None
) -> ProcessStack:
    """Start the four services under `root` (data, workspaces, logs) and wait until each is healthy."""
    env, addresses, metrics = _base_environment(database_url, redis_url, keys_dir, root, extra or {})
    for directory in ("data", "workspaces", "logs"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # the sandboxed workspace user must reach the workspaces
    os.chmod(root / "workspaces", 0o755)
    stack = ProcessStack(
        addresses,
        metrics,
        {name: root / "logs" / f"{name}.log" for name in SERVICES},
        str(root / "workspaces"),
        str(root / "data"),
    )
    try:
        for name in SERVICES:
            with open(stack.logs[name], "wb") as log:  # noqa: ASYNC230 (the child inherits the file)
                stack.processes[name] = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "services.cli.main",
                    "serve",
                    name,
                    env=service_environment(env, name),
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
        for name in SERVICES:
            proc = stack.processes[name]
            try:
                await wait_for_health(addresses[name], within=60, alive=lambda p=proc: p.returncode is None)  # type: ignore[misc]
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(
                    f"{name} did not start: {exc}\n{stack.log_text()[name][-3000:]}"
                ) from None
    except BaseException:
        await stack.stop()
        raise
    return stack
