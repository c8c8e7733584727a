"""How client commands (`agentplane chat ...`, `agentplane admin ...`) reach a service and who they are.

Identity, in order: `--token`, then `AGENTPLANE_TOKEN`, then a token minted for `--user`
(default `$USER`, admin with `--admin`) with the user issuer key: `AGENTPLANE_ISSUER_KEY_FILE`, or
the one `agentplane up` keeps in `<AGENTPLANE_DATA_DIR>/keys/users.pem`. Address: `--address`, else
the service's `AGENTPLANE_<SVC>_ADDR` (default 127.0.0.1 and the service's port).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import json_format
from google.protobuf.message import Message

from services.common import auth, rpc_errors
from services.common.client import create_channel
from services.common.keys import KeyUnavailable
from services.common.settings import Settings

T = TypeVar("T")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--address`, `--token`, `--user` and `--admin`."""
    group = parser.add_argument_group("connection")
    group.add_argument("--address", help="host:port of the service (default from AGENTPLANE_<SVC>_ADDR)")
    group.add_argument("--token", help="bearer token (default AGENTPLANE_TOKEN, else minted for --user)")
    group.add_argument("--user", help="user id to act as when minting a token (default $USER)")
    group.add_argument("--admin", action="store_true", help="mint an admin token")


def cli_token(args: argparse.Namespace, settings: Settings) -> str:
    """The bearer token this command sends."""
    token = getattr(args, "token", None) or os.environ.get("AGENTPLANE_TOKEN")
    if token:
        return token
    user = getattr(args, "user", None) or os.environ.get("USER") or getpass.getuser()
    role = auth.Role.ADMIN if getattr(args, "admin", False) else auth.Role.USER
    return mint_cli_token(settings, user, role, 3600)


def mint_cli_token(settings: Settings, user: str, role: auth.Role, ttl_seconds: float) -> str:
    """A user token signed with the user issuer key (`AGENTPLANE_ISSUER_KEY_FILE`, or the key
    directory `agentplane up` keeps in its data directory); a clear exit when there is none."""
    try:
        return auth.mint_token(settings.keys, user, role, ttl_seconds)
    except KeyUnavailable as exc:
        raise SystemExit(
            f"cannot mint a token: {exc}. Pass --token (or set AGENTPLANE_TOKEN) instead."
        ) from None


def open_channel(args: argparse.Namespace, service: str) -> grpc.aio.Channel:
    """A channel to `service` carrying this command's token."""
    settings = Settings.from_env()
    address = getattr(args, "address", None) or settings.address(service)
    return create_channel(address, token=cli_token(args, settings))


def to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict with the proto's field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


async def call(action: Callable[[], Awaitable[T]]) -> T | None:
    """Run an RPC-making coroutine; print a person-readable error and return None on failure."""
    try:
        return await action()
    except grpc.aio.AioRpcError as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        return None


def describe(exc: grpc.aio.AioRpcError) -> str:
    """`CODE (REASON): message` for an RPC error."""
    info = rpc_errors.error_info(exc)
    reason = f" ({info[0]})" if info and info[0] else ""
    return f"{exc.code().name}{reason}: {exc.details()}"
