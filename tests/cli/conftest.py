"""The `agentplane` command against real servers: the chat test stack (simulator, config, inference,
toolexec, chat on port 0) and a runner that starts the CLI as its own process, as a user would."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import Settings
from tests.chat.conftest import Stack, start_stack, stop_stack

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "services.cli.main"]


@dataclass
class Result:
    """What one run of the CLI did."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """Stdout parsed as JSON."""
        return json.loads(self.out)

    def json_error(self) -> dict[str, Any]:
        """The JSON error object on stderr (the only line there)."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        parsed: dict[str, Any] = json.loads(lines[0])["error"]
        return parsed


def cli_env(keys_dir: str, **addresses: str) -> dict[str, str]:
    """The environment of a CLI run: the test deployment's keys, no ambient token, and
    ``AGENTPLANE_<SVC>_ADDR`` for each ``svc=address`` given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    env["AGENTPLANE_KEYS_DIR"] = keys_dir
    for service, address in addresses.items():
        env[f"AGENTPLANE_{service.upper()}_ADDR"] = address
    return env


async def run_cli(env: dict[str, str], *argv: str, stdin: bytes | None = None, within: float = 60) -> Result:
    """Run `agentplane ARGV...` to the end."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, *argv, env=env, cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), within)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@dataclass
class CliStack:
    """The running services and a CLI environment pointing at them."""

    stack: Stack
    env: dict[str, str]

    async def run(self, *argv: str, stdin: bytes | None = None, within: float = 60) -> Result:
        """Run the CLI against this stack."""
        return await run_cli(self.env, *argv, stdin=stdin, within=within)


@pytest.fixture
async def cli_stack(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str, keys_dir: str
) -> AsyncIterator[CliStack]:
    """The chat test stack, and the CLI's environment to reach every service of it."""
    stack = await start_stack(settings, make_token, workspaces_dir)
    try:
        s = stack.settings
        env = cli_env(
            keys_dir,
            config=s.address("config"),
            inference=s.address("inference"),
            toolexec=s.address("toolexec"),
            chat=s.address("chat"),
        )
        yield CliStack(stack, env)
    finally:
        await stop_stack(stack)
