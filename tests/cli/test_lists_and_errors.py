"""List commands print a header row in text (JSON unchanged); under `--output json` errors are one
JSON object on stderr, stdout stays empty and the exit code non-zero."""

from __future__ import annotations

import json

from services.common.embedded import free_port
from tests.cli.conftest import CliStack, cli_env, run_cli


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.strip().splitlines()]


async def test_list_commands_print_a_header_row(cli_stack: CliStack, keys_dir: str) -> None:
    run, model_id = cli_stack.run, cli_stack.stack.model_config_id
    r = await run("admin", "provider", "list")
    assert r.code == 0, r.err
    assert _rows(r.out)[0] == ["ID", "TYPE", "ENABLED", "BASE_URL", "DISPLAY_NAME"]
    assert _rows(r.out)[1][0] and len(_rows(r.out)) == 2

    r = await run("admin", "model", "list")
    assert r.code == 0, r.err
    rows = _rows(r.out)
    assert rows[0] == ["ID", "MODEL_NAME", "ENABLED", "IS_DEFAULT", "CONTEXT_LIMIT", "DISPLAY_NAME"]
    assert rows[1] == [model_id, "sim-model", "true", "true", "200000", "sim-model"]

    r = await run(
        "admin", "template", "add", "--name", "py", "--description", "Python project\nsecond line",
        "--dir", "/srv/templates/py",
    )  # fmt: skip
    assert r.code == 0, r.err
    r = await run("admin", "template", "list")
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert lines[0].split() == ["ID", "NAME", "ENABLED", "NETWORK_ACCESS", "DESCRIPTION"]
    assert lines[1].split()[1:] == ["py", "true", "false", "Python", "project", "…"]
    # The columns line up under their headers.
    assert lines[1].index("py") == lines[0].index("NAME")

    r = await run("chat", "list", "--user", "alice")
    assert r.code == 0 and r.out.strip() == "no chats", r.out
    r = await run("chat", "new", "first chat", "--user", "alice", "-o", "json")
    assert r.code == 0, r.err
    chat_id = r.json()["id"]
    r = await run("chat", "list", "--user", "alice")
    assert r.code == 0, r.err
    rows = _rows(r.out)
    assert rows[0] == ["ID", "STATUS", "UPDATED", "TITLE"] and rows[1][0] == chat_id and len(rows) == 2

    r = await run("workspace", "create", "ws-one", "--user", "alice")
    assert r.code == 0, r.err
    assert _rows(r.out)[0] == ["ID", "STATE", "OWNER", "DRIVER", "AGENT", "NAME", "FAILURE"]
    r = await run("workspace", "list", "--user", "alice")
    assert r.code == 0, r.err
    rows = _rows(r.out)
    assert rows[0] == ["ID", "STATE", "OWNER", "DRIVER", "AGENT", "NAME", "FAILURE"]
    assert rows[1][1:] == ["ready", "alice", "local", "connected", "ws-one"]

    r = await run("token", "revoke", "tok-123", "--reason", "leaked", "--user", "ops", "--admin")
    assert r.code == 0, r.err
    r = await run("token", "revoked", "--user", "ops", "--admin")
    assert r.code == 0, r.err
    rows = _rows(r.out)
    assert rows[0] == ["TOKEN_ID", "REVOKED_BY", "EXPIRES", "REASON"]
    assert rows[1][:2] == ["tok-123", "ops"] and rows[1][3] == "leaked"

    r = await run_cli(cli_env(keys_dir), "keys", "show", keys_dir)
    assert r.code == 0, r.err
    rows = _rows(r.out)
    assert rows[1] == ["SCOPE", "KID"] and rows[2][0] == "users"

    # JSON output is unchanged: the same structures as before, no header.
    r = await run("admin", "model", "list", "-o", "json")
    assert [m["id"] for m in r.json()["model_configs"]] == [model_id]
    r = await run("chat", "list", "--user", "alice", "-o", "json")
    assert [c["id"] for c in r.json()] == [chat_id]
    r = await run("workspace", "list", "--user", "alice", "-o", "json")
    assert [w["name"] for w in r.json()] == ["ws-one"]
    r = await run("token", "revoked", "--admin", "-o", "json")
    assert [t["token_id"] for t in r.json()] == ["tok-123"]
    r = await run_cli(cli_env(keys_dir), "keys", "show", keys_dir, "-o", "json")
    assert {k["agentplane_scope"] for k in r.json()["keys"]} >= {"users", "service:chat"}


async def test_errors_under_output_json_are_json_objects(cli_stack: CliStack, keys_dir: str) -> None:
    run = cli_stack.run
    missing = "00000000-0000-4000-8000-000000000000"
    # An error from a server: its code, reason and message.
    r = await run("chat", "show", missing, "--user", "alice", "-o", "json")
    assert r.code == 1 and r.out == ""
    error = r.json_error()
    assert error["code"] == "NOT_FOUND" and error["message"] and "reason" in error
    r = await run("workspace", "delete", "ws_missing", "--user", "alice", "--output=json")
    assert r.code == 1 and r.out == "" and r.json_error()["code"] in ("NOT_FOUND", "INVALID_ARGUMENT")
    r = await run("admin", "prompt", "set", "hijack", "--token", cli_stack.stack.make_token("eve"), "-ojson")
    assert r.code == 1 and r.json_error()["code"] == "PERMISSION_DENIED"
    # The same errors in text stay text.
    r = await run("chat", "show", missing, "--user", "alice")
    assert r.code == 1 and r.err.startswith("error: NOT_FOUND") and not r.err.startswith("{")

    # A server nobody answers at.
    r = await run("chat", "list", "--address", f"127.0.0.1:{free_port()}", "-o", "json")
    assert r.code == 1 and r.out == "" and r.json_error()["code"] == "UNAVAILABLE"
    # Errors the command finds itself: bad input, an unreadable file, no key to mint a token with.
    r = await run("workspace", "create", "w", "--param", "novalue", "-o", "json")
    assert r.code == 1 and r.json_error() == {
        "code": "INVALID_ARGUMENT",
        "reason": "",
        "message": "--param must be NAME=VALUE, got 'novalue'",
    }
    r = await run("chat", "send", missing, "--file", "/nonexistent/message.txt", "-o", "json")
    assert r.code == 1 and r.json_error()["reason"] == "UNREADABLE_FILE"
    no_keys = {k: v for k, v in cli_stack.env.items() if k != "AGENTPLANE_KEYS_DIR"}
    no_keys["AGENTPLANE_DATA_DIR"] = "/nonexistent"
    r = await run_cli(no_keys, "chat", "list", "-o", "json")
    assert r.code == 1 and r.json_error()["code"] == "FAILED_PRECONDITION", r.err
    assert "--token" in r.json_error()["message"]
    r = await run_cli(cli_env(keys_dir), "keys", "show", "/nonexistent", "-o", "json")
    assert r.code == 1 and r.json_error()["code"] == "NOT_FOUND"
    # Usage errors too (exit code 2, as argparse's).
    r = await run("chat", "show", "-o", "json")
    assert r.code == 2 and r.out == ""
    assert r.json_error()["code"] == "INVALID_ARGUMENT" and "chat_id" in r.json_error()["message"]
    r = await run("chat", "list", "--status", "bogus", "--output", "json")
    assert r.code == 2 and json.loads(r.err)["error"]["reason"] == "USAGE"
