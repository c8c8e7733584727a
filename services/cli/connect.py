"""How client commands (`agentplane chat ...`, `agentplane admin ...`) reach a service and who they are.

Every client command takes the same four flags: `--address`, `--token`, `--user`, `--admin`.

Identity, in order: `--token`; a token minted for `--user` (admin with `--admin`) when either flag
is given; `AGENTPLANE_TOKEN`; else a token minted for `$USER`. `admin ...` commands always mint an
admin token. Minting uses the user issuer key: `AGENTPLANE_ISSUER_KEY_FILE`, or the one
`agentplane up` keeps in `<AGENTPLANE_DATA_DIR>/keys/users.pem`. Address: `--address`, else the
service's `AGENTPLANE_<SVC>_ADDR` (default 127.0.0.1 and the service's port).
"""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import json_format
from google.protobuf.message import Message

from services.cli.output import CliError, error
from services.common import auth, rpc_errors
from services.common.client import create_channel
from services.common.keys import KeyUnavailable
from services.common.settings import Settings

T = TypeVar("T")

# Notes the parser collected for `main` to print once the output format is known.
NOTICES_ATTR = "cli_notices"


class _DeprecatedUserAlias(argparse.Action):
    """`--as-user NAME`: the old spelling of `--user NAME` (admin and prompt commands)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        namespace.user = values
        notices = list(getattr(namespace, NOTICES_ATTR, None) or [])
        notices.append("warning: --as-user is deprecated and will be removed; use --user")
        setattr(namespace, NOTICES_ATTR, notices)


def add_connection_arguments(parser: argparse.ArgumentParser, *, deprecated_as_user: bool = False) -> None:
    """Add `--address`, `--token`, `--user` and `--admin` (and the hidden `--as-user` alias)."""
    group = parser.add_argument_group("connection")
    group.add_argument("--address", help="host:port of the service (default from AGENTPLANE_<SVC>_ADDR)")
    group.add_argument(
        "--token", help="bearer token (default: minted for --user/--admin, else AGENTPLANE_TOKEN)"
    )
    group.add_argument("--user", help="user id to mint a token for (default $USER)")
    group.add_argument("--admin", action="store_true", help="mint an admin token")
    if deprecated_as_user:
        group.add_argument("--as-user", dest="user", action=_DeprecatedUserAlias, help=argparse.SUPPRESS)


def cli_token(args: argparse.Namespace, settings: Settings, *, admin: bool = False) -> str:
    """The bearer token this command sends (see the module docstring for the order)."""
    token = getattr(args, "token", None)
    if token:
        return str(token)
    user = getattr(args, "user", None)
    want_admin = admin or bool(getattr(args, "admin", False))
    if not user and not getattr(args, "admin", False):
        env_token = os.environ.get("AGENTPLANE_TOKEN", "").strip()
        if env_token:
            return env_token
    user = user or os.environ.get("USER") or getpass.getuser()
    role = auth.Role.ADMIN if want_admin else auth.Role.USER
    return mint_cli_token(settings, user, role, 3600)


def mint_cli_token(settings: Settings, user: str, role: auth.Role, ttl_seconds: float) -> str:
    """A user token signed with the user issuer key (`AGENTPLANE_ISSUER_KEY_FILE`, or the key
    directory `agentplane up` keeps in its data directory); a clear error when there is none."""
    try:
        return auth.mint_token(settings.keys, user, role, ttl_seconds)
    except KeyUnavailable as exc:
        raise CliError(
            f"cannot mint a token: {exc}. Pass --token (or set AGENTPLANE_TOKEN) instead.",
            code="FAILED_PRECONDITION",
            reason="NO_ISSUER_KEY",
        ) from None


def service_address(args: argparse.Namespace, service: str, settings: Settings | None = None) -> str:
    """Where `service` is: `--address`, else its `AGENTPLANE_<SVC>_ADDR`."""
    return getattr(args, "address", None) or (settings or Settings.from_env()).address(service)


def open_channel(
    args: argparse.Namespace, service: str, *, admin: bool = False, address: str | None = None
) -> grpc.aio.Channel:
    """A channel to `service` (or `address`) carrying this command's token (admin with `admin`)."""
    settings = Settings.from_env()
    target = address or service_address(args, service, settings)
    return create_channel(target, token=cli_token(args, settings, admin=admin))


def to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict with the proto's field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


async def call(args: argparse.Namespace | None, action: Callable[[], Awaitable[T]]) -> T | None:
    """Run an RPC-making coroutine; print the error (JSON with `--output json`) and return None
    on failure."""
    try:
        return await action()
    except grpc.aio.AioRpcError as exc:
        report_rpc_error(args, exc)
        return None


def report_rpc_error(args: argparse.Namespace | None, exc: grpc.aio.AioRpcError, prefix: str = "") -> None:
    """Print a failed call: `error: CODE (REASON): message`, or its JSON object."""
    info = rpc_errors.error_info(exc)
    reason, metadata = info if info else ("", {})
    error(args, prefix + (exc.details() or ""), code=exc.code().name, reason=reason, metadata=metadata)


def describe(exc: grpc.aio.AioRpcError) -> str:
    """`CODE (REASON): message` for an RPC error."""
    info = rpc_errors.error_info(exc)
    reason = f" ({info[0]})" if info and info[0] else ""
    return f"{exc.code().name}{reason}: {exc.details()}"
