"""One `agentplane up` per data directory, and `up` saying what it is doing while it starts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.cli import data_dir_lock
from services.cli.main import build_parser
from services.common.client import wait_for_health
from services.common.embedded import free_port
from tests.test_up import _env, data_root  # noqa: F401  (data_root is a fixture used below)

PROGRESS = [
    "starting embedded Postgres",
    "starting embedded Redis",
    "applying database migrations",
    "starting the LLM simulator",
    "starting config",
    "starting inference",
    "starting toolexec",
    "starting chat",
    "waiting for config to answer its health check",
    "waiting for chat to answer its health check",
    "every service is serving",
    "seeding the first providers: simulator",
]


def _agentplane(*argv: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", *argv]


async def _read_until(stream: asyncio.StreamReader, marker: bytes) -> bytes:
    text = b""
    while marker not in text:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"agentplane up ended its output early: {text!r}")
        text += line
    return text


@pytest.mark.timeout(240)
async def test_a_second_up_on_the_same_data_dir_names_the_first_and_leaves_it_serving(
    data_root: Path,  # noqa: F811
) -> None:
    env = _env(data_root)
    data_dir = data_root / "data"
    stderr_file = data_root / "first-up.stderr"
    with stderr_file.open("wb") as err:
        first = await asyncio.create_subprocess_exec(
            *_agentplane("up", "--simulator-port", str(free_port())),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    assert first.stdout is not None
    try:
        banner = (await asyncio.wait_for(_read_until(first.stdout, b"Ctrl-C to stop"), 150)).decode()
        assert "admin token:" in banner and "agentplane up [" not in banner  # progress is not on stdout

        # Progress went to stderr, in order, before the banner.
        lines = stderr_file.read_text().splitlines()
        progress = [line for line in lines if line.startswith("agentplane up [")]
        positions = [next((i for i, line in enumerate(progress) if step in line), -1) for step in PROGRESS]
        assert -1 not in positions and positions == sorted(positions), progress
        assert "(first start: initialising it)" in progress[0]

        began = time.monotonic()
        second = await asyncio.create_subprocess_exec(
            *_agentplane("up", "--simulator-port", str(free_port())),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        out, err_bytes = await asyncio.wait_for(second.communicate(), 60)
        took = time.monotonic() - began
        message = err_bytes.decode()
        assert second.returncode == 1, message
        assert f"is in use by another `agentplane up` (process {first.pid})" in message
        assert str(data_dir) in message
        assert out == b""  # no banner
        assert "agentplane up [" not in message  # it started nothing
        assert took < 20, f"the second up took {took:.1f}s to give up"

        # The first is untouched: its lock, its services, its database.
        assert (data_dir / data_dir_lock.LOCK_FILENAME).read_text() == f"{first.pid}\n"
        for name in ("config", "inference", "toolexec", "chat"):
            await wait_for_health(env[f"AGENTPLANE_{name.upper()}_ADDR"], within=10)
        listing = await asyncio.create_subprocess_exec(
            *_agentplane("chat", "list", "--output", "json"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        listed, _ = await asyncio.wait_for(listing.communicate(), 60)
        assert listing.returncode == 0, listed.decode()
        assert first.returncode is None

        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 60) == 0
        # Gone: the directory is free for the next `up`.
        data_dir_lock.acquire(data_dir).release()
    finally:
        if first.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, signal.SIGKILL)
            await first.wait()


def test_up_on_a_locked_data_dir_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.cli import up

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("AGENTPLANE_DATA_DIR", str(data_dir))
    for key in ("AGENTPLANE_KEYS_DIR", "AGENTPLANE_JWKS", "AGENTPLANE_ENCRYPTION_KEY", "DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    held = data_dir_lock.acquire(data_dir)  # another open file description: flock says no to `up`
    try:
        assert up.run(build_parser().parse_args(["up"])) == 1
        assert sorted(p.name for p in data_dir.iterdir()) == [data_dir_lock.LOCK_FILENAME]
    finally:
        held.release()


async def test_the_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys, pathlib; from services.cli import data_dir_lock; "
        "data_dir_lock.acquire(pathlib.Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()",
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdout is not None
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"
        with pytest.raises(data_dir_lock.DataDirInUse) as refused:
            data_dir_lock.acquire(tmp_path)
        assert refused.value.pid == holder.pid
    finally:
        holder.kill()
        await holder.wait()
    # Its file is still there, naming a dead process, but holds no lock.
    assert (tmp_path / data_dir_lock.LOCK_FILENAME).read_text() == f"{holder.pid}\n"
    lock = data_dir_lock.acquire(tmp_path)
    try:
        assert (tmp_path / data_dir_lock.LOCK_FILENAME).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
