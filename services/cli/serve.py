"""`agentplane serve NAME`: run one service until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Coroutine
from typing import Any

from services.common import aio
from services.common.settings import SERVICE_NAMES, Settings, SettingsError


def register(subparsers: Any) -> None:
    """Add the `serve` command."""
    parser = subparsers.add_parser("serve", help="run one service (config, inference, toolexec, chat)")
    parser.add_argument("service", choices=SERVICE_NAMES)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    """Import ``services.<name>.server``; the coroutine awaits its ``serve(settings)``.

    A server module may set ``EVENT_LOOP`` to the loop it prefers (see services/common/aio.py).
    """
    module = importlib.import_module(f"services.{args.service}.server")
    args.event_loop = getattr(module, "EVENT_LOOP", aio.UVLOOP)
    return _serve(module)


async def _serve(module: Any) -> int:
    try:
        await module.serve(Settings.from_env())
    except SettingsError as exc:
        # A configuration the service cannot run with: say what to set, not a traceback.
        print(f"agentplane serve: {exc}", file=sys.stderr)
        return 2
    return 0
