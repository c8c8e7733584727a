"""Issue 11: a service acting for user X reaches only X's user prompt.

GetUserPrompt is the config RPC that names a user: a service acting for alice may name only alice
(empty means alice) and gets PERMISSION_DENIED (NOT_OWNER, as a user naming someone else does) for
bob. Admins and services acting for nobody (the chat service outside a request) may name anyone.
UpdateUserPrompt names nobody: it always writes the effective user's own prompt.

The rule lives in `services.config.prompts.user_prompt_owner`; `ConfigService.get_user_prompt`
(services/config/service.py) calls it.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from agentplane.config.v1 import config_service_pb2 as pb

from services.common import auth
from services.common.auth import Identity, Role
from services.common.errors import PermissionDenied
from services.config.client import ConfigClient
from services.config.prompts import user_prompt_owner
from services.config.server import ConfigServer
from tests.config.conftest import StubFactory
from tests.config.rpc import expect_error

DENIED = grpc.StatusCode.PERMISSION_DENIED
FOR_ALICE = [(auth.ON_BEHALF_OF_METADATA_KEY, "alice")]

ALICE = Identity("alice", Role.USER)
ADMIN = Identity("root", Role.ADMIN)
BARE_CHAT = Identity("service:chat", Role.SERVICE)
CHAT_FOR_ALICE = Identity("service:chat", Role.SERVICE, acting_for="alice")


# --- the rule itself, on identities -----------------------------------------------------


@pytest.mark.parametrize("identity", [ALICE, CHAT_FOR_ALICE])
def test_user_prompt_owner_for_a_user_or_a_service_acting_for_one(identity: Identity) -> None:
    assert user_prompt_owner(identity, "") == "alice"
    assert user_prompt_owner(identity, "alice") == "alice"
    with pytest.raises(PermissionDenied) as err:
        user_prompt_owner(identity, "bob")
    assert err.value.reason == "NOT_OWNER"


def test_user_prompt_owner_message_says_whom_the_service_acts_for() -> None:
    with pytest.raises(PermissionDenied) as err:
        user_prompt_owner(CHAT_FOR_ALICE, "bob")
    assert "service:chat acting for alice" in str(err.value)


def test_user_prompt_owner_for_admins_and_bare_services() -> None:
    assert user_prompt_owner(ADMIN, "bob") == "bob"
    assert user_prompt_owner(ADMIN, "") == "root"
    assert user_prompt_owner(BARE_CHAT, "bob") == "bob"
    with pytest.raises(PermissionDenied) as err:
        user_prompt_owner(BARE_CHAT, "")
    assert err.value.reason == "USER_REQUIRED"


# --- over gRPC -------------------------------------------------------------------------


async def _set_prompts(stub_for: StubFactory, make_token: Callable[..., str]) -> None:
    for user in ("alice", "bob"):
        await stub_for(make_token(user)).UpdateUserPrompt(pb.UpdateUserPromptRequest(text=f"{user}'s prompt"))


async def test_service_acting_for_alice_cannot_read_bobs_prompt(
    config: ConfigServer,
    stub_for: StubFactory,
    make_token: Callable[..., str],
    service_token: Callable[[str], str],
) -> None:
    await _set_prompts(stub_for, make_token)
    chat = stub_for(service_token("chat"))
    message, reason, _ = await expect_error(
        chat.GetUserPrompt(pb.GetUserPromptRequest(user_id="bob"), metadata=FOR_ALICE), DENIED
    )
    assert reason == "NOT_OWNER" and "bob's prompt" not in message


async def test_config_client_acting_for_alice_cannot_read_bobs_prompt(
    config: ConfigServer,
    stub_for: StubFactory,
    make_token: Callable[..., str],
    service_token: Callable[[str], str],
) -> None:
    await _set_prompts(stub_for, make_token)
    async with ConfigClient(config.address, service_token("chat")) as client:
        with auth.acting_for("alice"), pytest.raises(PermissionDenied):
            await client.get_user_prompt("bob")


async def test_service_acting_for_alice_reads_and_writes_alices_prompt(
    config: ConfigServer,
    stub_for: StubFactory,
    make_token: Callable[..., str],
    service_token: Callable[[str], str],
) -> None:
    await _set_prompts(stub_for, make_token)
    chat = stub_for(service_token("chat"))
    for named in ("", "alice"):
        got = (
            await chat.GetUserPrompt(pb.GetUserPromptRequest(user_id=named), metadata=FOR_ALICE)
        ).user_prompt
        assert got.user_id == "alice" and got.text == "alice's prompt"
    written = (
        await chat.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="via chat"), metadata=FOR_ALICE)
    ).user_prompt
    assert written.user_id == "alice"
    assert (
        await stub_for(make_token("alice")).GetUserPrompt(pb.GetUserPromptRequest())
    ).user_prompt.text == ("via chat")
    bobs = (await stub_for(make_token("bob")).GetUserPrompt(pb.GetUserPromptRequest())).user_prompt
    assert bobs.text == "bob's prompt"


async def test_config_client_acting_for_the_owner_reads_the_owners_prompt(
    config: ConfigServer,
    stub_for: StubFactory,
    make_token: Callable[..., str],
    service_token: Callable[[str], str],
) -> None:
    """The chat loop's path: `user_prompt(owner)` inside `acting_for(owner)`."""
    await _set_prompts(stub_for, make_token)
    async with ConfigClient(config.address, service_token("chat")) as client:
        with auth.acting_for("bob"):
            assert await client.get_user_prompt("bob") == "bob's prompt"
        with auth.acting_for("alice"):
            assert await client.get_user_prompt("alice") == "alice's prompt"


async def test_admin_reads_bobs_prompt(
    config: ConfigServer,
    admin: object,
    stub_for: StubFactory,
    make_token: Callable[..., str],
) -> None:
    await _set_prompts(stub_for, make_token)
    root = stub_for(make_token("root", "admin"))
    got = (await root.GetUserPrompt(pb.GetUserPromptRequest(user_id="bob"))).user_prompt
    assert got.user_id == "bob" and got.text == "bob's prompt"


async def test_bare_service_still_reads_any_prompt_but_writes_none(
    config: ConfigServer,
    stub_for: StubFactory,
    make_token: Callable[..., str],
    service_token: Callable[[str], str],
) -> None:
    await _set_prompts(stub_for, make_token)
    chat = stub_for(service_token("chat"))
    got = (await chat.GetUserPrompt(pb.GetUserPromptRequest(user_id="bob"))).user_prompt
    assert got.text == "bob's prompt"
    _, reason, _ = await expect_error(chat.GetUserPrompt(pb.GetUserPromptRequest()), DENIED)
    assert reason == "USER_REQUIRED"
    _, reason, _ = await expect_error(chat.UpdateUserPrompt(pb.UpdateUserPromptRequest(text="x")), DENIED)
    assert reason == "USER_REQUIRED"


async def test_users_still_read_only_their_own_prompt(
    config: ConfigServer,
    stub_for: StubFactory,
    make_token: Callable[..., str],
) -> None:
    await _set_prompts(stub_for, make_token)
    alice = stub_for(make_token("alice"))
    _, reason, _ = await expect_error(alice.GetUserPrompt(pb.GetUserPromptRequest(user_id="bob")), DENIED)
    assert reason == "NOT_OWNER"
