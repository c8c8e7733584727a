"""One set of connection flags on every client command: `--address`, `--token`, `--user`, `--admin`
(`admin` and `prompt` included; their old `--as-user` still works, with a warning)."""

from __future__ import annotations

import argparse
import json

from services.cli.main import build_parser
from services.common.embedded import free_port
from tests.cli.conftest import CliStack, run_cli

CLIENT_GROUPS = ("admin", "prompt", "chat", "workspace")
CONNECTION_FLAGS = {"--address", "--token", "--user", "--admin"}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], set[str]]:
    """Every runnable command under `parser` and the option strings it takes."""
    found: dict[tuple[str, ...], set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_leaves(sub, (*path, name)))
            return found
    found[path] = {option for action in parser._actions for option in action.option_strings}
    return found


def test_every_client_command_takes_the_same_connection_flags() -> None:
    commands = {
        path: options
        for path, options in _leaves(build_parser()).items()
        if path[0] in CLIENT_GROUPS or path[:2] in (("token", "revoke"), ("token", "revoked"))
    }
    assert len(commands) > 25
    missing = {" ".join(path): sorted(CONNECTION_FLAGS - options) for path, options in commands.items()}
    assert {k: v for k, v in missing.items() if v} == {}
    # --as-user survives only as a hidden alias of --user on admin and prompt commands.
    assert {p[0] for p, options in commands.items() if "--as-user" in options} == {"admin", "prompt"}
    assert "--as-user" not in build_parser().parse_args(["prompt", "get", "--as-user", "bob"]).__dict__
    help_text = "".join(
        sub.format_help()
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for sub in action.choices.values()
    )
    assert "--as-user" not in help_text


async def test_prompt_and_admin_take_user_token_and_address(cli_stack: CliStack) -> None:
    run = cli_stack.run
    r = await run("prompt", "set", "bob likes tests", "--user", "bob")
    assert r.code == 0, r.err
    r = await run("prompt", "get", "--user", "bob", "-o", "json")
    assert r.code == 0 and r.json()["text"] == "bob likes tests", r.err
    # A token given with --token: whoever it names.
    r = await run("prompt", "get", "--token", cli_stack.stack.make_token("bob"), "-o", "json")
    assert r.code == 0 and r.json()["text"] == "bob likes tests", r.err
    # --user beats AGENTPLANE_TOKEN; without a flag the environment's token is used.
    env = {**cli_stack.env, "AGENTPLANE_TOKEN": cli_stack.stack.make_token("carol")}
    r = await run_cli(env, "prompt", "get", "--user", "bob", "-o", "json")
    assert r.code == 0 and r.json()["text"] == "bob likes tests", r.err
    r = await run_cli(env, "prompt", "get", "-o", "json")
    assert r.code == 0 and r.json()["text"] == "", r.out

    # The deprecated spelling still works and says so.
    r = await run("prompt", "get", "--as-user", "bob")
    assert r.code == 0 and r.out.strip() == "bob likes tests", r.err
    assert "--as-user is deprecated" in r.err and "--user" in r.err
    r = await run("prompt", "get", "--as-user", "bob", "-o", "json")
    assert r.code == 0 and json.loads(r.err)["notice"]["message"].startswith("warning: --as-user")

    # admin commands mint an admin token for --user (default $USER), with or without --admin.
    r = await run("admin", "prompt", "set", "be brief", "--user", "ops", "-o", "json")
    assert r.code == 0 and r.json()["text"] == "be brief", r.err
    r = await run("admin", "prompt", "get", "--admin", "-o", "json")
    assert r.code == 0 and r.json()["text"] == "be brief", r.err
    # ...but a user's token stays a user's.
    r = await run("admin", "prompt", "set", "hijack", "--token", cli_stack.stack.make_token("mallory"))
    assert r.code == 1 and "PERMISSION_DENIED" in r.err
    # A non-admin token can do user things through the same flags on chat and workspace commands.
    r = await run("chat", "list", "--token", cli_stack.stack.make_token("mallory"), "-o", "json")
    assert r.code == 0 and r.json() == [], r.err
    r = await run("workspace", "list", "--user", "mallory", "-o", "json")
    assert r.code == 0 and r.json() == [], r.err

    # --address reaches the service named, here the config service behind a closed port.
    r = await run("prompt", "get", "--user", "bob", "--address", f"127.0.0.1:{free_port()}")
    assert r.code == 1 and "UNAVAILABLE" in r.err
    r = await run("admin", "model", "list", "--address", cli_stack.stack.settings.address("config"))
    assert r.code == 0 and "sim-model" in r.out, r.err
