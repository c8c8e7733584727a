"""`agentplane keys init DIR` / `agentplane keys show DIR`: the deployment's signing keys.

`init` makes (or completes) a key directory: the user issuer key (``users.pem``, for the operator
and `agentplane token create`), one signing key per service (``<service>.pem``), and the public key
set every process verifies against (``jwks.json``). Existing keys are kept. Give each service only
its own ``.pem`` (deploy/README.md shows how) and every process the ``jwks.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services.cli.output import CliError, add_output_argument, emit, table
from services.common import keys
from services.common.settings import SERVICE_NAMES


def register(subparsers: Any) -> None:
    """Add the `keys` command group."""
    group = subparsers.add_parser("keys", help="the deployment's signing keys")
    actions = group.add_subparsers(dest="keys_action", required=True)
    init = actions.add_parser("init", help="make (or complete) a key directory and its public key set")
    init.add_argument("directory", help="where the keys go (created 0700)")
    show = actions.add_parser("show", help="print a key directory's public key set")
    show.add_argument("directory")
    for parser in (init, show):
        add_output_argument(parser)
    init.set_defaults(func=init_keys)
    show.set_defaults(func=show_keys)


def init_keys(args: argparse.Namespace) -> int:
    """Make or complete the directory; print what is in it."""
    jwks = keys.init_dir(args.directory, SERVICE_NAMES)
    return _show(args, jwks)


def show_keys(args: argparse.Namespace) -> int:
    """Print the public key set."""
    return _show(args, Path(args.directory) / keys.JWKS_FILENAME)


def _show(args: argparse.Namespace, jwks: Path) -> int:
    try:
        data = json.loads(jwks.read_text())
    except FileNotFoundError:
        raise CliError(
            f"{jwks} does not exist: not a key directory (make one with `agentplane keys init DIR`)",
            code="NOT_FOUND",
            reason="NO_KEY_SET",
        ) from None
    except (OSError, ValueError) as exc:
        raise CliError(
            f"cannot read {jwks}: {exc}", code="FAILED_PRECONDITION", reason="BAD_KEY_SET"
        ) from None
    rows = [[k.get("agentplane_scope", ""), k.get("kid", "")] for k in data.get("keys", [])]
    emit(args, data, f"{jwks}\n" + table(["SCOPE", "KID"], rows, "(no keys)"))
    return 0
