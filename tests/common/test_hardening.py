"""PR_SET_DUMPABLE hardening: a same-uid process cannot read an undumpable process's environment.

The cross-process tests run the target processes *and* the reader as uid 65534 (setpriv), so the
only difference between the hardened process and the control process is the dumpable flag.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main as cli_main
from services.common import hardening
from services.common.embedded import free_port, start_redis

REPO = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
CAPLESS = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]
MARKER = "AGENTPLANE_TEST_MARKER"
MARKER_VALUE = "not-for-your-eyes-7f3a"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")

# A target that prints its dumpable flag after optionally hardening itself, then blocks on stdin.
TARGET = """
import sys
from services.common.hardening import is_dumpable, make_undumpable
harden = sys.argv[1] == "harden"
ok = make_undumpable() if harden else True
print("ready", ok, is_dumpable(), flush=True)
sys.stdin.read()
"""


def _child_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        MARKER: MARKER_VALUE,
    }


def _require_setpriv_as_root() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("prctl and /proc are Linux-only")
    if os.geteuid() != 0:
        pytest.skip("needs root to run the target and the reader as uid 65534 with setpriv")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    probe = subprocess.run(
        [*NOBODY, sys.executable, "-c", "import services.common.hardening"],
        env=_child_env(),
        cwd="/",
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot run {sys.executable} with the repository: {probe.stderr[-300:]!r}")


def _read_environ(as_user: list[str], pid: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*as_user, "cat", f"/proc/{pid}/environ"], capture_output=True, timeout=30, env=_child_env()
    )


@pytest.fixture
def nobody_targets() -> Iterator[dict[str, tuple[subprocess.Popen[str], str]]]:
    """Two uid-65534 processes, one hardened and one not, each with the marker in its environment."""
    _require_setpriv_as_root()
    procs: dict[str, tuple[subprocess.Popen[str], str]] = {}
    try:
        for mode in ("harden", "control"):
            proc = subprocess.Popen(
                [*NOBODY, sys.executable, "-c", TARGET, mode],
                env=_child_env(),
                cwd="/",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            procs[mode] = (proc, proc.stdout.readline().strip())
        yield procs
    finally:
        for proc, _ in procs.values():
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@linux_only
def test_make_undumpable_clears_the_flag() -> None:
    code = (
        "from services.common.hardening import is_dumpable, make_undumpable\n"
        "before = is_dumpable(); ok = make_undumpable(); print(before, ok, is_dumpable())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.split() == ["True", "True", "False"]


def test_make_undumpable_is_false_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardening.sys, "platform", "darwin")
    assert hardening.make_undumpable() is False
    assert hardening.is_dumpable() is None


def test_hardening_imports_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules)\n"
        "import services.common.hardening\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(m for m in new if m != 'services' and m not in sys.stdlib_module_names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "[]"


def test_same_uid_process_cannot_read_environ_of_undumpable_process(
    nobody_targets: dict[str, tuple[subprocess.Popen[str], str]],
) -> None:
    hardened, hardened_line = nobody_targets["harden"]
    control, control_line = nobody_targets["control"]
    # prctl(PR_GET_DUMPABLE) inside each target.
    assert hardened_line == "ready True False"
    assert control_line == "ready True True"
    # /proc: an undumpable process's files are owned by root; the control's by its own uid.
    assert os.stat(f"/proc/{hardened.pid}/environ").st_uid == 0
    assert os.stat(f"/proc/{control.pid}/environ").st_uid == 65534
    assert os.stat(f"/proc/{hardened.pid}").st_uid == 65534  # same uid: only the flag differs

    denied = _read_environ(NOBODY, hardened.pid)
    assert denied.returncode != 0
    assert b"Permission denied" in denied.stderr
    assert MARKER_VALUE.encode() not in denied.stdout

    allowed = _read_environ(NOBODY, control.pid)
    assert allowed.returncode == 0, allowed.stderr
    assert f"{MARKER}={MARKER_VALUE}".encode() in allowed.stdout.split(b"\0")


def test_agentplane_command_is_undumpable_end_to_end() -> None:
    """A real `agentplane simulator`: a same-uid process without capabilities cannot read its env.

    The full CLI needs the venv's interpreter and packages, which uid 65534 may not reach (a
    pyenv under /root), so here the command and the reader both run as uid 0 with every
    capability dropped: the same uid, no CAP_SYS_PTRACE; a capability-less `sleep` is the control.
    """
    _require_setpriv_as_root()
    procs: list[subprocess.Popen[str]] = []
    try:
        cli = subprocess.Popen(
            [*CAPLESS, sys.executable, "-m", "services.cli.main", "simulator", "--port", str(free_port())],
            env=_child_env(),
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(cli)
        control = subprocess.Popen(
            [*CAPLESS, sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
            env=_child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(control)
        assert cli.stdout is not None and control.stdout is not None
        line = cli.stdout.readline()
        assert "simulator listening" in line, line + cli.stdout.read(2000)
        assert control.stdout.readline().strip() == "ready"
        for proc in procs:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert "CapEff:\t0000000000000000" in status and "CapPrm:\t0000000000000000" in status

        denied = _read_environ(CAPLESS, cli.pid)
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        assert MARKER_VALUE.encode() not in denied.stdout
        allowed = _read_environ(CAPLESS, control.pid)
        assert allowed.returncode == 0, allowed.stderr
        assert f"{MARKER}={MARKER_VALUE}".encode() in allowed.stdout.split(b"\0")
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize(
    ("argv", "hardened"),
    [(["noop"], True), (["noop", "workspace-agent"], True), (["workspace-agent"], False)],
)
def test_main_hardens_every_command_but_workspace_agent(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], hardened: bool
) -> None:
    calls: list[bool] = []

    def record() -> bool:
        calls.append(True)
        return True

    monkeypatch.setattr(cli_main, "make_undumpable", record)

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("command")
        p.add_argument("rest", nargs="*")
        p.set_defaults(func=lambda args: 0)
        return p

    monkeypatch.setattr(cli_main, "build_parser", parser)
    # `workspace-agent` goes straight to the agent's own entry point (which hardens itself).
    import services.agent.main as agent_main

    monkeypatch.setattr(agent_main, "main", lambda argv: 0)
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(argv)
    assert exit_info.value.code == 0
    assert calls == ([True] if hardened else [])


def test_embedded_redis_does_not_inherit_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc")
    monkeypatch.setenv(MARKER, MARKER_VALUE)
    redis = start_redis()
    try:
        environ = Path(f"/proc/{redis.process.pid}/environ").read_bytes()
    finally:
        redis.stop()
    assert MARKER_VALUE.encode() not in environ
