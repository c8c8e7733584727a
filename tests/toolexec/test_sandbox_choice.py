"""Which sandbox the local driver uses, and refusing to run workspaces unsandboxed by accident."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.toolexec import sandbox
from services.toolexec.server import choose_sandbox
from services.toolexec.settings import ToolexecSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_explicit_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sandbox.choose("none").mode == "none"
    assert not sandbox.choose("none").isolated
    with pytest.raises(ValueError, match="must be one of"):
        sandbox.choose("chroot")
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        sandbox.choose("bwrap")


def test_auto_without_bubblewrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    with pytest.raises(sandbox.SandboxUnavailable, match="AGENTPLANE_WORKSPACE_SANDBOX=none"):
        sandbox.choose("auto")
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    chosen = sandbox.choose("auto")
    assert chosen.mode == "user" and chosen.uid == sandbox.DEFAULT_WORKSPACE_UID


def test_external_default_runs_without_the_local_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    external = ToolexecSettings(workspaces_dir=str(tmp_path), default_driver="external")
    assert choose_sandbox(external) is None


@pytest.mark.skipif(not sandbox.bwrap_works(), reason="needs bubblewrap to show auto picks it")
def test_auto_picks_bubblewrap_here() -> None:
    assert sandbox.choose("auto").mode == "bwrap"


def test_serve_refuses_without_a_sandbox(database_url: str, keys_dir: str, tmp_path: Path) -> None:
    env = {
        "PATH": str(tmp_path),  # no bwrap on it
        "DATABASE_URL": database_url,
        "AGENTPLANE_KEYS_DIR": keys_dir,
        "AGENTPLANE_TOOLEXEC_PORT": "0",
        "AGENTPLANE_TOOLEXEC_METRICS_PORT": "0",
        "AGENTPLANE_WORKSPACES_DIR": str(tmp_path / "ws"),
        "AGENTPLANE_WORKSPACE_SANDBOX": "bwrap",
        "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}",
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "serve", "toolexec"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "bubblewrap" in done.stderr and "install" in done.stderr, done.stderr[-2000:]
    # One line that says what to do, not a traceback.
    assert "Traceback" not in done.stderr and done.stderr.startswith("agentplane serve: "), done.stderr[
        -2000:
    ]


def test_user_and_bwrap_modes_give_each_workspace_its_own_uid() -> None:
    user = sandbox.Sandbox("user", 65534, 65534)
    a, b = user.ids_for("ws_0123456789abcdef0123"), user.ids_for("ws_fedcba98765432100123")
    assert a != b and min(a[0], b[0]) >= sandbox.USER_MODE_UID_BASE
    assert user.ids_for("ws_0123456789abcdef0123") == a
    # With namespaces too (per-user limits such as RLIMIT_NPROC do not follow namespaces)...
    assert sandbox.Sandbox("bwrap", 65534, 65534).ids_for("ws_0123456789abcdef0123") == a
    # ...unless AGENTPLANE_WORKSPACE_UID chose one uid for all.
    shared = sandbox.Sandbox("bwrap", 4242, 4242, shared_uid=True)
    assert shared.ids_for("ws_0123456789abcdef0123") == (4242, 4242)
