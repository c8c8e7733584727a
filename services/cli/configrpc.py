"""Shared plumbing of the config CLI commands (`agentplane admin ...`, `agentplane prompt ...`).

Connection and identity are those of every client command (`services.cli.connect`): ``--address``
(default ``AGENTPLANE_CONFIG_ADDR``), ``--token``, ``--user``, ``--admin``. ``admin`` commands
always send an admin token. ``--as-user`` is kept as a deprecated alias of ``--user``.

Model configs are named by id or by name: `resolve_model` turns a name into the id.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import grpc.aio
from agentplane.config.v1 import config_pb2, config_service_pb2_grpc
from agentplane.config.v1 import config_service_pb2 as pb
from google.protobuf import json_format

from services.cli import connect
from services.cli.output import CliError, add_output_argument, emit

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection flags of every client command, plus ``--output``."""
    connect.add_connection_arguments(parser, deprecated_as_user=True)
    add_output_argument(parser)


async def call(args: argparse.Namespace, method: str, request: Any, *, admin: bool) -> Any | None:
    """Run one ConfigService RPC; on failure print the error and return None."""
    channel = connect.open_channel(args, "config", admin=admin)
    try:
        stub = config_service_pb2_grpc.ConfigServiceStub(channel)
        return await connect.call(args, lambda: getattr(stub, method)(request, timeout=30))
    finally:
        await channel.close()


async def list_model_configs(
    args: argparse.Namespace, channel: grpc.aio.Channel, *, include_disabled: bool, provider_id: str = ""
) -> list[config_pb2.ModelConfig] | None:
    """Every model config the caller may see (all pages), or None after printing the error."""
    stub = config_service_pb2_grpc.ConfigServiceStub(channel)
    items: list[config_pb2.ModelConfig] = []
    token = ""
    while True:
        request = pb.ListModelConfigsRequest(
            page_size=500, page_token=token, provider_id=provider_id, include_disabled=include_disabled
        )
        response = await connect.call(args, lambda r=request: stub.ListModelConfigs(r, timeout=30))  # type: ignore[misc]
        if response is None:
            return None
        items += response.model_configs
        token = response.next_page_token
        if not token:
            return items


async def resolve_model(
    args: argparse.Namespace, value: str, *, admin: bool, address: str | None = None
) -> str | None:
    """The id of the model config `value` names: an id (anything shaped like a UUID is taken as
    one, unchecked), else the display name or provider model name of exactly one model config the
    caller can list (admins: disabled ones too). None after printing an RPC error; `CliError` for
    an unknown or ambiguous name."""
    if not value or UUID_RE.match(value):
        return value
    channel = connect.open_channel(args, "config", admin=admin, address=address)
    try:
        models = await list_model_configs(args, channel, include_disabled=admin)
    finally:
        await channel.close()
    if models is None:
        return None
    matches = [m for m in models if value in (m.id, m.display_name, m.model_name)]
    if len(matches) == 1:
        return str(matches[0].id)
    if not matches:
        known = sorted({m.display_name or m.model_name for m in models})
        listed = ", ".join(known) if known else "none"
        raise CliError(
            f"no model config named {value!r} (models: {listed}); give a model config id or name",
            code="NOT_FOUND",
            reason="MODEL_NOT_FOUND",
        )
    candidates = "; ".join(f"{m.id} ({m.display_name} / {m.model_name})" for m in matches)
    raise CliError(
        f"model name {value!r} is ambiguous: {len(matches)} model configs match ({candidates}); "
        "give the id instead",
        code="FAILED_PRECONDITION",
        reason="MODEL_NAME_AMBIGUOUS",
    )


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
        return read_input(args.file)
    if args.text is None:
        raise CliError("give TEXT, --file PATH or --clear")
    return read_input(args.text) if args.text == "-" else str(args.text)


def read_input(path: str) -> str:
    """The text of a file, or of stdin for ``-``; `CliError` when it cannot be read."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc}", reason="UNREADABLE_FILE") from None


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """TEXT | --file PATH | --clear."""
    parser.add_argument("text", nargs="?", default=None, help="the prompt text ('-' for stdin)")
    parser.add_argument("--file", default=None, help="read the text from a file ('-' for stdin)")
    parser.add_argument("--clear", action="store_true", help="clear the prompt")
