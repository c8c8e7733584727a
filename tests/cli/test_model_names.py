"""Model configs by name wherever the CLI takes a model config id: `chat new --model`, `admin model
set-default|update|delete`. Names are looked up with ListModelConfigs; unknown and ambiguous names
are clear errors."""

from __future__ import annotations

from tests.cli.conftest import CliStack


async def test_chat_new_takes_a_model_name(cli_stack: CliStack) -> None:
    run, model_id = cli_stack.run, cli_stack.stack.model_config_id
    r = await run("chat", "new", "hello", "--model", "sim-model", "--user", "alice", "-o", "json")
    assert r.code == 0, r.err
    assert r.json()["model_config_id"] == model_id
    # An id still works, and is passed through as it is.
    r = await run("chat", "new", "hello", "--model", model_id, "--user", "alice", "-o", "json")
    assert r.code == 0 and r.json()["model_config_id"] == model_id, r.err

    r = await run("chat", "new", "hello", "--model", "gpt-17", "--user", "alice")
    assert r.code == 1 and r.out == ""
    assert "no model config named 'gpt-17'" in r.err and "sim-model" in r.err, r.err
    r = await run("chat", "new", "hello", "--model", "gpt-17", "--user", "alice", "-o", "json")
    assert r.code == 1 and r.out == ""
    error = r.json_error()
    assert (error["code"], error["reason"]) == ("NOT_FOUND", "MODEL_NOT_FOUND")
    assert "gpt-17" in error["message"]


async def test_admin_model_commands_take_names_and_refuse_ambiguous_ones(cli_stack: CliStack) -> None:
    run, first_id = cli_stack.run, cli_stack.stack.model_config_id
    r = await run("admin", "provider", "list", "-o", "json")
    assert r.code == 0, r.err
    provider_id = r.json()["providers"][0]["id"]
    # A second model with the same provider model name but its own display name.
    r = await run(
        "admin", "model", "add", "--provider", provider_id, "--model", "sim-model", "--name", "sim-big",
        "--context-limit", "400000", "-o", "json",
    )  # fmt: skip
    assert r.code == 0, r.err
    second_id = r.json()["id"]

    r = await run("admin", "model", "set-default", "sim-model", "-o", "json")
    assert r.code == 1 and r.out == ""
    error = r.json_error()
    assert (error["code"], error["reason"]) == ("FAILED_PRECONDITION", "MODEL_NAME_AMBIGUOUS")
    assert first_id in error["message"] and second_id in error["message"]
    r = await run("chat", "new", "hi", "--model", "sim-model", "--user", "alice")
    assert r.code == 1 and "ambiguous" in r.err and "give the id" in r.err

    # The display name is unique: every admin model command takes it.
    r = await run("admin", "model", "set-default", "sim-big", "-o", "json")
    assert r.code == 0 and r.json()["id"] == second_id and r.json()["is_default"] is True, r.err
    r = await run("admin", "model", "update", "sim-big", "--context-limit", "300000", "-o", "json")
    assert r.code == 0 and r.json()["context_limit"] == "300000", r.err
    r = await run("admin", "model", "update", "sim-big", "--disable", "-o", "json")
    assert r.code == 1  # the default may not be disabled: an error from the server, not the lookup
    assert r.json_error()["code"] != "NOT_FOUND"
    r = await run("admin", "model", "set-default", first_id)
    assert r.code == 0, r.err
    r = await run("admin", "model", "update", "sim-big", "--disable")
    assert r.code == 0, r.err
    # A disabled model: users cannot name it; admins still can.
    r = await run("chat", "new", "hi", "--model", "sim-big", "--user", "alice")
    assert r.code == 1 and "no model config named 'sim-big'" in r.err
    r = await run("admin", "model", "delete", "sim-big", "-o", "json")
    assert r.code == 0, r.err
    r = await run("admin", "model", "list", "--all", "-o", "json")
    assert [m["id"] for m in r.json()["model_configs"]] == [first_id]
    r = await run("admin", "model", "delete", "sim-big")
    assert r.code == 1 and "no model config named 'sim-big'" in r.err
