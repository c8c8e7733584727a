"""`agentplane`: the one command line of the product.

Command groups live in their own modules, listed in `COMMAND_MODULES`; each exposes
``register(subparsers)`` and sets ``func`` on its parsers via ``set_defaults(func=...)``.
``func(args)`` returns an exit code, or a coroutine that does (run with asyncio).
To add a group, write the module and add one line to `COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Sequence

from services.common import aio
from services.common.hardening import make_undumpable

# Commands that run outside the control plane's trust domain and harden themselves.
SELF_HARDENING_COMMANDS = frozenset({"workspace-agent"})

COMMAND_MODULES: list[str] = [
    "services.cli.serve",
    "services.cli.migrate",
    "services.cli.token",
    "services.cli.keys",
    "services.cli.up",
    "services.cli.bench",
    "services.cli.admin",
    "services.cli.prompt",
    "services.cli.simulator",
    "services.cli.chat",
    "services.cli.workspace",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered command group."""
    parser = argparse.ArgumentParser(prog="agentplane", description="agentplane control plane")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `agentplane` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "workspace-agent":
        # The agent runs inside workspaces: its own light entry point, none of the service modules.
        from services.agent.main import main as agent_main

        sys.exit(agent_main(argv[1:]))
    if not argv or argv[0] not in SELF_HARDENING_COMMANDS:
        # Before anything reads a secret: no same-uid process may ptrace this one or read its
        # /proc/PID/environ or memory (a workspace's code included).
        make_undumpable()
    args = build_parser().parse_args(argv)
    result = args.func(args)
    if inspect.iscoroutine(result):
        try:
            result = aio.run(result, prefer=getattr(args, "event_loop", aio.UVLOOP))
        except KeyboardInterrupt:
            result = 130
    sys.exit(int(result or 0))


if __name__ == "__main__":
    main()
