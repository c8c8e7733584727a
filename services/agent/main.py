"""`agentplane workspace-agent`: run the workspace agent (inside the workspace).

Configuration comes from flags or the environment; the token is read from
``AGENTPLANE_AGENT_TOKEN`` (removed from the environment at once, so no command inherits
it), ``--token-file`` or ``--token-stdin`` — a token on the command line would be visible
to every process of the workspace in /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

import grpc

from services.agent import reaper
from services.agent.calls import AgentCalls
from services.agent.connection import AgentConnection, AgentOptions, is_local_target, uses_tls
from services.agent.processes import ProcessLimits, ProcessManager
from services.agent.record import ResultRecord
from services.agent.runner import ToolRunner

log = logging.getLogger("agentplane.agent")

TOKEN_ENV = "AGENTPLANE_AGENT_TOKEN"
LIMITS_ENV = "AGENTPLANE_AGENT_RLIMITS"
REAP_INTERVAL_SECONDS = 5.0


def build_parser() -> argparse.ArgumentParser:
    """The agent's own argument parser (kept apart from the control plane's CLI: the agent is light)."""
    p = argparse.ArgumentParser(
        prog="agentplane workspace-agent",
        description="Run a workspace agent: it dials toolexec and runs the workspace's tool calls.",
    )
    p.add_argument("--url", default=os.environ.get("AGENTPLANE_AGENT_URL", ""), help="toolexec's address")
    p.add_argument("--workspace", default=os.environ.get("AGENTPLANE_WORKSPACE_ID", ""), help="workspace id")
    p.add_argument(
        "--root",
        default=os.environ.get("AGENTPLANE_WORKSPACE_ROOT", ""),
        help="workspace directory (default: cwd)",
    )
    p.add_argument(
        "--state-dir",
        default=os.environ.get("AGENTPLANE_AGENT_STATE_DIR", ""),
        help="where the agent keeps its record of recent calls (outside the workspace root; "
        "default ~/.agentplane-agent/<workspace>)",
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("AGENTPLANE_AGENT_TLS_CA", ""),
        help="CA certificate file for an https:// or grpcs:// URL (default: the system's roots)",
    )
    p.add_argument("--token-file", default="", help="read the agent token from this file")
    p.add_argument(
        "--token-stdin", action="store_true", help="read the agent token from the first line of stdin"
    )
    p.add_argument("--log-level", default=os.environ.get("AGENTPLANE_LOG_LEVEL", "INFO"))
    return p


def _read_token(args: argparse.Namespace) -> str:
    token = os.environ.pop(TOKEN_ENV, "")
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    elif args.token_stdin:
        token = sys.stdin.readline().strip()
        sys.stdin.close()
    return token


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS for https:// and grpcs:// URLs; plaintext otherwise (with a warning off this machine)."""
    if uses_tls(args.url):
        roots = None
        if args.tls_ca:
            with open(args.tls_ca, "rb") as f:
                roots = f.read()
        return grpc.ssl_channel_credentials(root_certificates=roots)
    if not is_local_target(args.url):
        log.warning(
            "dialing %s in plaintext: the token and every file and command cross the network "
            "unencrypted; use an https:// (or grpcs://) URL where toolexec serves TLS",
            args.url,
        )
    return None


def _limits() -> ProcessLimits:
    """rlimits for commands from ``AGENTPLANE_AGENT_RLIMITS`` (cpu:fsize:nofile:nproc; 0 = inherit)."""
    raw = os.environ.pop(LIMITS_ENV, "")
    if not raw:
        return ProcessLimits()
    try:
        cpu, fsize, nofile, nproc = (int(x) for x in raw.split(":"))
    except ValueError:
        raise SystemExit(
            f"workspace-agent: {LIMITS_ENV} must be cpu:fsize:nofile:nproc, got {raw!r}"
        ) from None
    return ProcessLimits(cpu, fsize, nofile, nproc)


async def run(args: argparse.Namespace, token: str, root: str, state: str, limits: ProcessLimits) -> int:
    """Serve until the workspace is deleted or the token is refused."""
    reaper.become_subreaper()
    processes = ProcessManager(os.path.join(state, "processes"), limits)
    killed = await asyncio.to_thread(processes.sweep_leftovers)
    if killed:
        log.warning("killed %d processes left by a previous run of the agent", killed)
    record = ResultRecord(os.path.join(state, "calls"))
    calls = AgentCalls(ToolRunner(root, processes, args.workspace), record)

    def terminate() -> None:
        reaper.kill_descendants()
        record.clear()

    connection = AgentConnection(
        AgentOptions(args.url, token, args.workspace, terminate, _credentials(args)), calls
    )

    async def reap() -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_SECONDS)
            reaper.reap_orphans(processes.pids())

    reaping = asyncio.create_task(reap())
    # Orphans re-parented to the agent are reaped as they exit, not only every few seconds.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGCHLD, lambda: reaper.reap_orphans(processes.pids())
        )
    try:
        return await connection.run_forever()
    finally:
        reaping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaping


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (`agentplane workspace-agent ...` and ``python -m services.agent``)."""
    from services.common.hardening import make_undumpable

    make_undumpable()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s agent %(levelname)s %(message)s", stream=sys.stderr
    )
    token = _read_token(args)
    missing = [name for name, value in (("--url", args.url), ("--workspace", args.workspace)) if not value]
    if not token:
        missing.append(f"a token ({TOKEN_ENV}, --token-file or --token-stdin)")
    if missing:
        print(f"workspace-agent: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    root = os.path.realpath(args.root or os.getcwd())
    state = os.path.realpath(
        args.state_dir or os.path.join(os.path.expanduser("~"), ".agentplane-agent", args.workspace)
    )
    if os.path.commonpath([root, state]) == root:
        print(f"workspace-agent: the state directory {state} must be outside the workspace root {root}")
        return 2
    os.makedirs(state, mode=0o700, exist_ok=True)
    from services.common import tracing

    # Spans of the calls, joined to the caller's trace, where the environment names an OTLP
    # collector the agent can reach (an external agent; the local sandbox has no network).
    tracing.configure("workspace-agent")
    try:
        return asyncio.run(run(args, token, root, state, _limits()))
    except KeyboardInterrupt:
        return 130
    finally:
        tracing.shutdown()
