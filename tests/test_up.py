"""`agentplane up` on a fresh data directory: embedded Postgres and Redis, all services, the
simulator as the first provider, and a chat driven from the CLI to the end of its turn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from services.common.embedded import free_port


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_")}
    for key in ("DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        env.pop(key, None)
    env["AGENTPLANE_DATA_DIR"] = str(tmp_path / "data")
    env["AGENTPLANE_WORKSPACES_DIR"] = str(tmp_path / "workspaces")
    env["AGENTPLANE_LOG_LEVEL"] = "WARNING"
    for name in ("config", "inference", "toolexec", "chat"):
        port = free_port()
        env[f"AGENTPLANE_{name.upper()}_PORT"] = str(port)
        env[f"AGENTPLANE_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"AGENTPLANE_{name.upper()}_METRICS_PORT"] = "-1"
    return env


async def _read_json_object(stream: asyncio.StreamReader) -> dict[str, object]:
    """Read lines until they form one JSON object (``up --output json`` prints it indented).

    Stdout holds that object alone: the services' logs and the simulator's own line go to stderr."""
    text = ""
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"agentplane up ended its output early: {text!r}")
        text += line.decode()
        if line.startswith(b"}"):
            parsed: dict[str, object] = json.loads(text)
            return parsed


@pytest.fixture
def data_root() -> Iterator[Path]:
    """A directory the embedded Postgres's own system user can reach (it runs as one when we are root)."""
    root = Path(tempfile.mkdtemp(prefix="agentplane-test-up-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(180)
async def test_up_runs_the_product_offline_and_a_chat_completes(data_root: Path) -> None:
    tmp_path = data_root
    env = _env(tmp_path)
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        "up",
        "--output",
        "json",
        "--simulator-port",
        str(free_port()),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert up.stdout is not None
    try:
        info = await asyncio.wait_for(_read_json_object(up.stdout), 120)
        services = info["services"]
        assert isinstance(services, dict) and set(services) == {"config", "inference", "toolexec", "chat"}
        seeded = info["seeded"]
        assert isinstance(seeded, list) and len(seeded) == 1 and seeded[0].startswith("simulator")
        assert (tmp_path / "data" / "keys" / "jwks.json").exists()

        # The CLI finds the user issuer key `up` keeps and mints a user token with it.
        chat = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli.main",
            "chat",
            "new",
            "Say something [[words=8]]",
            "--wait",
            "--output",
            "json",
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(chat.communicate(), 60)
        assert chat.returncode == 0, out.decode()
        events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        kinds = [next(k for k in e if k not in ("seq", "chat_id", "time")) for e in events]
        assert "part_delta" in kinds
        assert events[-1]["status_changed"]["status"] == "CHAT_STATUS_WAITING"
        seqs = [int(e["seq"]) for e in events]
        assert seqs == sorted(set(seqs))

        # `agentplane token create` signs with the issuer key `up` keeps: the running stack accepts it.
        minted = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli.main",
            "token",
            "create",
            "--user",
            "carol",
            "--output",
            "json",
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(minted.communicate(), 60)
        assert minted.returncode == 0, out.decode()
        token = json.loads(out)["token"]
        listing = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli.main",
            "chat",
            "list",
            "--token",
            token,
            "--output",
            "json",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(listing.communicate(), 60)
        assert listing.returncode == 0, out.decode()

        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 5  # four services and the simulator (plus embedded Redis)
        # SIGTERM to `up` alone: it must stop everything it started and exit cleanly.
        up.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(up.wait(), 60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if up.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(up.pid, signal.SIGKILL)
            await up.wait()


def test_services_started_by_up_do_not_get_the_provider_keys() -> None:
    from services.cli.up import service_environment

    env = {
        "OPENAI_API_KEY": "sk-real",
        "ANTHROPIC_API_KEY": "sk-ant",
        "DATABASE_URL": "postgresql://x",
        "PATH": "/bin",
    }
    assert service_environment(env) == {"DATABASE_URL": "postgresql://x", "PATH": "/bin"}


def test_each_service_started_by_up_gets_only_its_own_key() -> None:
    from services.cli.up import service_environment

    env = {
        "AGENTPLANE_KEYS_DIR": "/data/keys",
        "AGENTPLANE_ISSUER_KEY_FILE": "/data/keys/users.pem",
        "AGENTPLANE_CONFIG_SIGNING_KEY_FILE": "/data/keys/config.pem",
        "PATH": "/bin",
    }
    child = service_environment(env, "toolexec")
    keys_env = {k: v for k, v in child.items() if k != "PATH"}
    assert keys_env == {
        "AGENTPLANE_JWKS": "/data/keys/jwks.json",
        "AGENTPLANE_TOOLEXEC_SIGNING_KEY_FILE": "/data/keys/toolexec.pem",
    }
    # And what the child parses from it: the public keys and its own signing key, nothing else.
    from services.common.settings import Settings

    held = Settings.from_env(child).keys
    assert held.signing_file("toolexec") == "/data/keys/toolexec.pem"
    assert held.signing_file("config") is None and "issuer=False" in repr(held)


def test_a_served_process_keeps_only_its_own_key() -> None:
    from services.common.settings import Settings

    everything = Settings.from_env({"AGENTPLANE_KEYS_DIR": "/data/keys"}).keys
    assert everything.signing_file("chat") and "issuer=True" in repr(everything)
    only = everything.only("toolexec")
    assert only.signing_file("toolexec") == "/data/keys/toolexec.pem"
    assert only.signing_file("chat") is None and "issuer=False" in repr(only)
