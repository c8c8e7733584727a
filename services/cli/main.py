"""`agentplane`: the one command line of the product.

Command groups live in their own modules, listed in `COMMAND_MODULES`; each exposes
``register(subparsers)`` and sets ``func`` on its parsers via ``set_defaults(func=...)``.
``func(args)`` returns an exit code, or a coroutine that does (run with asyncio).
To add a group, write the module and add one line to `COMMAND_MODULES`.

Conventions `main` keeps for every command (docs/cli.md):
- A reader that goes away early (``agentplane chat list | head -1``) ends the command quietly with
  exit code 141 (128 + SIGPIPE, what a shell reports for a program a closed pipe stops).
- Errors go to stderr: ``error: ...`` in text, one JSON object ``{"error": {"code", "reason",
  "message"}}`` with ``--output json`` (usage errors included, exit code 2); other failures exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from services.cli.connect import NOTICES_ATTR
from services.cli.output import CliError, error, notice
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
    "services.cli.demo",
    "services.cli.bench",
    "services.cli.admin",
    "services.cli.prompt",
    "services.cli.simulator",
    "services.cli.chat",
    "services.cli.workspace",
]


# Exit code when stdout's reader went away: what a shell reports for a process killed by SIGPIPE.
EXIT_BROKEN_PIPE = 141
JSON_ERRORS = argparse.Namespace(output="json")


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are JSON when the command line asks for JSON output."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if not Parser.json_errors:
            super().error(message)
        error(JSON_ERRORS, f"{self.prog}: {message}", code="INVALID_ARGUMENT", reason="USAGE")
        sys.exit(2)


def wants_json(argv: Sequence[str]) -> bool:
    """Whether the command line has ``--output json`` (``-o json``, ``-ojson``, ``--output=json``,
    or an abbreviation argparse accepts such as ``--out json``)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            return False
        name, eq, value = arg.partition("=")
        if arg.startswith("-o") and not arg.startswith("--"):
            value, eq = arg[2:], "=" if len(arg) > 2 else ""
            name = "-o"
        elif not (len(name) >= 3 and "--output".startswith(name)):
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if value == "json":
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered command group."""
    parser = Parser(prog="agentplane", description="agentplane control plane")
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
    Parser.json_errors = wants_json(argv)
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        for note in getattr(args, NOTICES_ATTR, None) or []:
            notice(args, note)
        code = _run(args)
        sys.stdout.flush()  # inside the try: a reader gone away shows here for buffered output
    except BrokenPipeError:
        code = _stdout_gone()
    except CliError as exc:
        code = _failed(args, exc.message, code=exc.code_name, reason=exc.reason)
    except SystemExit as exc:
        # A message of a command outside this convention: Python prints it as is, but under
        # --output json it becomes the JSON error.
        json_wanted = getattr(args, "output", None) == "json" or (args is None and Parser.json_errors)
        if not isinstance(exc.code, str) or not json_wanted:
            raise
        code = _failed(args, exc.code, code="UNKNOWN", reason="")
    sys.exit(code)


def _run(args: argparse.Namespace) -> int:
    result = args.func(args)
    if inspect.iscoroutine(result):
        try:
            result = aio.run(result, prefer=getattr(args, "event_loop", aio.UVLOOP))
        except KeyboardInterrupt:
            result = 130
    return int(result or 0)


def _failed(args: argparse.Namespace | None, message: str, *, code: str, reason: str) -> int:
    try:
        shown_as = args or (JSON_ERRORS if Parser.json_errors else None)
        error(shown_as, message, code=code, reason=reason, show_code=False)
    except BrokenPipeError:
        pass
    return 1


def _stdout_gone() -> int:
    """Stdout's reader closed it: point stdout at /dev/null so the interpreter's last flush has
    nowhere to fail, and end quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    main()
