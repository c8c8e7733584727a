"""`agentplane migrate`: apply pending SQL migrations to DATABASE_URL."""

from __future__ import annotations

import argparse
from typing import Any

from services.cli.output import add_output_argument, emit
from services.common.migrations import migrate
from services.common.settings import Settings


def register(subparsers: Any) -> None:
    """Add the `migrate` command."""
    parser = subparsers.add_parser("migrate", help="apply pending database migrations")
    parser.add_argument("--database-url", help="default: DATABASE_URL")
    add_output_argument(parser)
    parser.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    """Apply migrations and print what was applied."""
    url = args.database_url or Settings.from_env().require_database_url()
    applied = await migrate(url)
    rows = [{"component": m.component, "version": m.version, "name": m.name} for m in applied]
    text = "\n".join(f"applied {r['component']}/{r['version']:04d}_{r['name']}" for r in rows)
    emit(args, {"applied": rows}, text or "nothing to apply")
    return 0
