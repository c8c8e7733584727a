"""`agentplane prompt get|set`: the calling user's own prompt; chats append it to the system prompt.

The user is the one of the token: ``--token``, a token minted for ``--user`` (default ``$USER``),
or ``AGENTPLANE_TOKEN`` (see `services.cli.connect`). ``set`` takes TEXT, ``-`` or ``--file PATH``
(stdin for ``-``), or ``--clear``.
"""

from __future__ import annotations

import argparse
from typing import Any

from agentplane.config.v1 import config_service_pb2 as pb

from services.cli.configrpc import add_connection_arguments, add_text_arguments, call, read_text, show


def register(subparsers: Any) -> None:
    """Add the `prompt` command group."""
    prompt = subparsers.add_parser("prompt", help="your own prompt (config service)")
    actions = prompt.add_subparsers(dest="prompt_action", required=True)
    get = actions.add_parser("get", help="print your prompt")
    add_connection_arguments(get)
    get.set_defaults(func=get_prompt)
    set_ = actions.add_parser("set", help="set (or --clear) your prompt")
    add_connection_arguments(set_)
    add_text_arguments(set_)
    set_.set_defaults(func=set_prompt)


async def get_prompt(args: argparse.Namespace) -> int:
    """Print the caller's prompt."""
    response = await call(args, "GetUserPrompt", pb.GetUserPromptRequest(), admin=False)
    if response is None:
        return 1
    return show(args, response.user_prompt, response.user_prompt.text)


async def set_prompt(args: argparse.Namespace) -> int:
    """Set the caller's prompt."""
    request = pb.UpdateUserPromptRequest(text=read_text(args))
    response = await call(args, "UpdateUserPrompt", request, admin=False)
    if response is None:
        return 1
    return show(args, response.user_prompt, response.user_prompt.text or "(prompt cleared)")
