"""The config CLI (`agentplane admin ...`, `agentplane prompt ...`) against a real server, as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from services.config.server import ConfigServer


async def _cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *argv,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_admin_and_prompt_commands(config: ConfigServer, keys_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENTPLANE_TOKEN"}
    env.update(AGENTPLANE_KEYS_DIR=keys_dir, AGENTPLANE_CONFIG_ADDR=config.address, SIM_KEY="sk-cli-key-123")
    code, out, err = await _cli(
        env, "admin", "provider", "add", "--type", "openai-compatible", "--name", "sim",
        "--base-url", "http://127.0.0.1:9/v1", "--api-key-env", "SIM_KEY", "--output", "json",
    )  # fmt: skip
    assert code == 0, err
    provider = json.loads(out)
    assert provider["api_key_set"] is True and "sk-cli-key-123" not in out
    code, out, err = await _cli(
        env, "admin", "model", "add", "--provider", provider["id"], "--model", "m1",
        "--context-limit", "8000", "--input-price", "1000000", "--temperature", "0.3", "--output", "json",
    )  # fmt: skip
    assert code == 0, err
    model = json.loads(out)
    assert model["is_default"] is True and model["pricing"]["input_micros_per_million"] == "1000000"
    code, out, err = await _cli(env, "admin", "model", "list", "--output", "json")
    assert code == 0, err
    assert [m["id"] for m in json.loads(out)["model_configs"]] == [model["id"]]

    code, out, err = await _cli(env, "admin", "provider", "delete", provider["id"])
    assert code == 1 and "FAILED_PRECONDITION" in err and model["id"] in err

    code, out, err = await _cli(
        env, "admin", "template", "add", "--name", "py", "--description", "Python project",
        "--dir", "/srv/templates/py", "--network", "--output", "json",
    )  # fmt: skip
    assert code == 0, err
    template = json.loads(out)
    assert template["network_access"] is True
    code, out, err = await _cli(env, "admin", "template", "list", "--output", "json")
    assert code == 0, err
    assert [(t["name"], t["network_access"]) for t in json.loads(out)["workspace_templates"]] == [
        ("py", True)
    ]
    code, out, err = await _cli(
        env, "admin", "template", "update", template["id"], "--no-network", "--output", "json"
    )
    assert code == 0, err
    assert json.loads(out)["network_access"] is False and json.loads(out)["description"] == "Python project"
    code, out, err = await _cli(env, "admin", "template", "list")
    header, row = out.splitlines()
    assert code == 0 and header.split()[:4] == ["ID", "NAME", "ENABLED", "NETWORK_ACCESS"], out
    assert row.split()[:4] == [template["id"], "py", "true", "false"], out

    code, out, err = await _cli(env, "prompt", "set", "I like tests", "--user", "bob")
    assert code == 0, err
    code, out, err = await _cli(env, "prompt", "get", "--user", "bob", "--output", "json")
    assert code == 0 and json.loads(out)["text"] == "I like tests"
    # A user token may not write the system prompt.
    user_env = {**env, "AGENTPLANE_TOKEN": _user_token()}
    code, out, err = await _cli(user_env, "admin", "prompt", "set", "hijack")
    assert code == 1 and "PERMISSION_DENIED" in err


def _user_token() -> str:
    from services.common import auth
    from tests.helpers import deployment_keys

    return auth.mint_token(deployment_keys(), "mallory", auth.Role.USER)


async def test_rotate_encryption_key_and_base_url_commands(config: ConfigServer, keys_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENTPLANE_TOKEN"}
    env.update(AGENTPLANE_KEYS_DIR=keys_dir, AGENTPLANE_CONFIG_ADDR=config.address, SIM_KEY="sk-cli-key-456")
    code, out, err = await _cli(
        env, "admin", "provider", "add", "--type", "openai-compatible", "--name", "sim",
        "--base-url", "http://127.0.0.1:9/v1", "--api-key-env", "SIM_KEY", "--output", "json",
    )  # fmt: skip
    assert code == 0, err
    provider_id = json.loads(out)["id"]
    code, out, err = await _cli(env, "admin", "rotate-encryption-key", "--validate-only", "--output", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["key_id"] == "test" and result["already_current_count"] == 1
    assert result["reencrypted_provider_ids"] == []
    code, out, err = await _cli(env, "admin", "rotate-encryption-key")
    assert code == 0 and "test" in out, err
    # A new base URL without a key drops the stored one, and the command says so.
    code, out, err = await _cli(
        env, "admin", "provider", "update", provider_id, "--base-url", "https://elsewhere.example/v1",
        "--output", "json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["api_key_set"] is False
    assert "API key" in err and "--api-key-env" in err
    code, out, err = await _cli(
        env, "admin", "provider", "update", provider_id, "--base-url", "https://elsewhere2.example/v1",
        "--api-key-env", "SIM_KEY", "--output", "json",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["api_key_set"] is True, err
    assert "API key" not in err
    # Users may not rotate.
    user_env = {**env, "AGENTPLANE_TOKEN": _user_token()}
    code, out, err = await _cli(user_env, "admin", "rotate-encryption-key")
    assert code == 1 and "PERMISSION_DENIED" in err
