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

COMMAND_MODULES: list[str] = [
    "services.cli.serve",
    "services.cli.migrate",
    "services.cli.token",
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
