"""`agentplane demo` (`make demo`): the product end to end, offline by default (services/demo)."""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from typing import Any

from services.cli.output import add_output_argument, json_mode


def register(subparsers: Any) -> None:
    """Add the `demo` command."""
    parser = subparsers.add_parser(
        "demo",
        help="bring the stack up, let an agent fix a failing test in a sandboxed workspace, summarise, stop",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="use the LLM simulator even when OPENAI_API_KEY or ANTHROPIC_API_KEY is set",
    )
    parser.add_argument("--keep", action="store_true", help="keep the demo's workspace afterwards")
    parser.add_argument(
        "--data-dir", help="the demo stack's data directory (default: <AGENTPLANE_DATA_DIR>/demo)"
    )
    add_output_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    """Run the demo (services.demo.run)."""
    from services.demo.run import run_demo

    return run_demo(offline=args.offline, keep=args.keep, json_output=json_mode(args), data_dir=args.data_dir)
