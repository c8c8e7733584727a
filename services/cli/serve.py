"""`agentplane serve NAME`: run one service until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from services.common.settings import SERVICE_NAMES, Settings


def register(subparsers: Any) -> None:
    """Add the `serve` command."""
    parser = subparsers.add_parser("serve", help="run one service (config, inference, toolexec, chat)")
    parser.add_argument("service", choices=SERVICE_NAMES)
    parser.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    """Import ``services.<name>.server`` and await its ``serve(settings)``."""
    settings = Settings.from_env()
    module = importlib.import_module(f"services.{args.service}.server")
    await module.serve(settings)
    return 0
