"""Shared plumbing of the config CLI commands (`agentplane admin ...`, `agentplane prompt ...`).

Where: ``--address`` (default ``AGENTPLANE_CONFIG_ADDR``, else 127.0.0.1:50051).
Who: ``AGENTPLANE_TOKEN`` when set; otherwise a short-lived token minted with the deployment
user issuer key (``AGENTPLANE_ISSUER_KEY_FILE``, or the one `agentplane up` keeps) for ``--as-user`` (admin
commands: an admin named ``--as-user``, default ``admin``; ``prompt``: the user ``--as-user``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc
import grpc.aio
from agentplane.config.v1 import config_service_pb2_grpc
from google.protobuf import json_format

from services.cli.connect import mint_cli_token
from services.cli.output import add_output_argument, emit
from services.common import auth
from services.common.client import create_channel
from services.common.rpc_errors import error_info
from services.common.settings import Settings


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--address``, ``--as-user`` and ``--output``."""
    parser.add_argument(
        "--address", default=None, help="config service host:port (default AGENTPLANE_CONFIG_ADDR)"
    )
    parser.add_argument(
        "--as-user",
        default=None,
        help="user id to mint a token for with the user issuer key (ignored with AGENTPLANE_TOKEN)",
    )
    add_output_argument(parser)


def token_for(args: argparse.Namespace, settings: Settings, *, admin: bool) -> str:
    """AGENTPLANE_TOKEN, or a token minted for ``--as-user`` (admin role for admin commands)."""
    token = os.environ.get("AGENTPLANE_TOKEN", "").strip()
    if token:
        return token
    user = args.as_user or ("admin" if admin else None)
    if not user:
        raise SystemExit("set AGENTPLANE_TOKEN or pass --as-user USER (with the user issuer key at hand)")
    role = auth.Role.ADMIN if admin else auth.Role.USER
    return mint_cli_token(settings, user, role, 300)


async def call(args: argparse.Namespace, method: str, request: Any, *, admin: bool) -> Any | None:
    """Run one ConfigService RPC; on failure print the server's message and reason, return None."""
    settings = Settings.from_env()
    channel = create_channel(
        args.address or settings.address("config"), token=token_for(args, settings, admin=admin)
    )
    try:
        stub = config_service_pb2_grpc.ConfigServiceStub(channel)
        return await getattr(stub, method)(request, timeout=30)
    except grpc.aio.AioRpcError as exc:
        info = error_info(exc)
        reason = f" [{info[0]}]" if info else ""
        print(f"error: {exc.code().name}: {exc.details()}{reason}", file=sys.stderr)
        return None
    finally:
        await channel.close()


def to_dict(message: Any) -> dict[str, Any]:
    """A proto message as a JSON-ready dict (proto field names, defaults included)."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def show(args: argparse.Namespace, message: Any, text: str | None = None) -> int:
    """Print a response (JSON with ``--output json``); exit code 0."""
    emit(args, to_dict(message), text)
    return 0


def read_text(args: argparse.Namespace) -> str:
    """The text of a ``set`` command: positional TEXT, ``--file`` (``-`` = stdin) or ``--clear``."""
    if getattr(args, "clear", False):
        return ""
    if getattr(args, "file", None):
        if args.file == "-":
            return sys.stdin.read()
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    if args.text is None:
        raise SystemExit("give TEXT, --file PATH or --clear")
    return str(args.text)


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """TEXT | --file PATH | --clear."""
    parser.add_argument("text", nargs="?", default=None, help="the prompt text")
    parser.add_argument("--file", default=None, help="read the text from a file ('-' for stdin)")
    parser.add_argument("--clear", action="store_true", help="clear the prompt")
