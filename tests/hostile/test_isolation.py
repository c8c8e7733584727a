"""One user cannot see or touch another's things, and no credential opens more than it should.

- Credentials, for every RPC (from the descriptors): no token, a malformed one, another scheme,
  an expired one, forged ones (a key the deployment does not publish; the issuer's key id with
  another key), a service key signing a user or an admin, and on-behalf-of from a user or naming a
  service. Each is refused with the status and reason that say so.
- Roles: `ACCESS` says who may call each RPC (a new RPC fails until it is listed); users are
  refused the admin and service RPCs, admins the service ones, bare services the user ones.
- Cross-user: bob (and the chat service acting for bob) uses alice's chat, message, queued
  message, workspace, user prompt and usage ids, and ids of disabled models and templates, in every
  RPC that takes one; each answer is NOT_FOUND or PERMISSION_DENIED and names nothing of alice's,
  and afterwards alice's data is exactly as before. Lists and watches show bob nothing of hers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import grpc.aio
import jwt
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2
from agentplane.config.v1 import config_service_pb2
from agentplane.toolexec.v1 import toolexec_service_pb2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import field_mask_pb2, text_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from services.common import auth
from services.common.keys import Keys
from tests.helpers import wait_until
from tests.hostile.rpcs import ALL_RPCS, Rpc, check_error, error_info, invoke, rpc
from tests.hostile.world import SECRET, UserData, World, text

# --- credentials ------------------------------------------------------------------------------


def _claims(subject: str, role: str, ttl: int = 3600) -> dict[str, object]:
    now = int(time.time())
    return {
        "sub": subject,
        "role": role,
        "iss": auth.ISSUER,
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }


def _bad_credentials(
    keys: Keys, make_token: Callable[..., str]
) -> dict[str, tuple[list[tuple[str, str]], set[str]]]:
    """name -> (metadata, reasons the deployment's interceptor answers)."""
    issuer_kid = keys.signer_for("alice").kid
    stranger = Ed25519PrivateKey.generate()
    chat_key = keys.signer_for("service:chat")

    def bearer(token: str) -> list[tuple[str, str]]:
        return [(auth.AUTHORIZATION_METADATA_KEY, f"Bearer {token}")]

    return {
        "missing": ([], {"TOKEN_MISSING"}),
        "malformed": (bearer("not-a-jwt"), {"TOKEN_MALFORMED"}),
        "other scheme": (
            [(auth.AUTHORIZATION_METADATA_KEY, f"Basic {make_token('alice')}")],
            {"TOKEN_MALFORMED"},
        ),
        "expired": (bearer(make_token("alice", "user", -60)), {"TOKEN_EXPIRED"}),
        "unpublished key": (
            bearer(
                jwt.encode(_claims("alice", "admin"), stranger, algorithm="EdDSA", headers={"kid": "forged"})
            ),
            {"TOKEN_INVALID"},
        ),
        "issuer kid, other key": (
            bearer(
                jwt.encode(
                    _claims("admin", "admin"), stranger, algorithm="EdDSA", headers={"kid": issuer_kid}
                )
            ),
            {"TOKEN_INVALID"},
        ),
        "service key signs an admin": (
            bearer(
                jwt.encode(
                    _claims("mallory", "admin"),
                    chat_key.key,
                    algorithm="EdDSA",
                    headers={"kid": chat_key.kid},
                )
            ),
            {"TOKEN_WRONG_SIGNER"},
        ),
        "service key signs another service": (
            bearer(
                jwt.encode(
                    _claims("service:inference", "service"),
                    chat_key.key,
                    algorithm="EdDSA",
                    headers={"kid": chat_key.kid},
                )
            ),
            {"TOKEN_WRONG_SIGNER"},
        ),
        "user acts on behalf of": (
            [*bearer(make_token("bob")), (auth.ON_BEHALF_OF_METADATA_KEY, "alice")],
            {"ON_BEHALF_OF_NOT_ALLOWED"},
        ),
        "admin acts on behalf of": (
            [*bearer(make_token("admin", "admin")), (auth.ON_BEHALF_OF_METADATA_KEY, "alice")],
            {"ON_BEHALF_OF_NOT_ALLOWED"},
        ),
        "service acts for a service": (
            [
                *bearer(make_token("service:chat", "service")),
                (auth.ON_BEHALF_OF_METADATA_KEY, "service:inference"),
            ],
            {"ON_BEHALF_OF_NOT_ALLOWED"},
        ),
    }


# The workspace agent's stream authenticates with its workspace's agent token, nothing else.
AGENT_TOKEN_RPCS = {"WorkspaceAgentService.Connect"}
AGENT_REFUSALS = {"TOKEN_MISSING", "TOKEN_MALFORMED", "AGENT_TOKEN_INVALID"}


async def test_every_rpc_refuses_bad_credentials(
    world: World, keys: Keys, make_token: Callable[..., str]
) -> None:
    failures: list[str] = []
    for name, (metadata, expected) in _bad_credentials(keys, make_token).items():
        for target in ALL_RPCS:
            what = f"{target.name} with {name} credentials"
            try:
                await invoke(world.channel(target.server), target, target.request_class(), metadata)
            except grpc.aio.AioRpcError as exc:
                info = check_error(exc, what)
                if target.name in AGENT_TOKEN_RPCS:
                    wanted_code, wanted = grpc.StatusCode.UNAUTHENTICATED, AGENT_REFUSALS
                elif expected == {"ON_BEHALF_OF_NOT_ALLOWED"}:
                    wanted_code, wanted = grpc.StatusCode.PERMISSION_DENIED, expected
                else:
                    wanted_code, wanted = grpc.StatusCode.UNAUTHENTICATED, expected
                if exc.code() != wanted_code or info.reason not in wanted:
                    failures.append(
                        f"{what}: {exc.code().name} {info.reason}, expected {wanted_code.name} {wanted}"
                    )
                continue
            failures.append(f"{what}: succeeded")
    assert not failures, "\n".join(failures)


# --- roles ------------------------------------------------------------------------------------

ANY = "any authenticated identity"
USER = "users (and services acting for one); a bare service gets USER_REQUIRED"
ADMIN = "admins only"
ADMIN_OR_SERVICE = "admins and services"
INFERENCE = "the inference service only"
TOOLEXEC = "toolexec replicas only"
AGENT = "a workspace agent's token only"
# Who may call each RPC. Every RPC must be listed: a new one fails test_access_table_is_complete.
ACCESS: dict[str, str] = {
    "AgentRelayService.RelaySignal": TOOLEXEC,
    "AgentRelayService.RelayToolCall": TOOLEXEC,
    "ChatService.CompactChat": USER,
    "ChatService.CreateChat": USER,
    "ChatService.DeleteChat": USER,
    "ChatService.DeleteQueuedMessage": USER,
    "ChatService.EditMessage": USER,
    "ChatService.ForkChat": USER,
    "ChatService.GetChat": USER,
    "ChatService.GetUsage": USER,
    "ChatService.InterruptChat": USER,
    "ChatService.ListChats": USER,
    "ChatService.ListMessages": USER,
    "ChatService.ListQueuedMessages": USER,
    "ChatService.PromoteQueuedMessage": USER,
    "ChatService.SendMessage": USER,
    "ChatService.StreamChat": USER,
    "ChatService.UpdateChat": USER,
    "ChatService.WatchChats": USER,
    "ConfigService.CreateModelConfig": ADMIN,
    "ConfigService.CreateProvider": ADMIN,
    "ConfigService.CreateWorkspaceTemplate": ADMIN,
    "ConfigService.DeleteModelConfig": ADMIN,
    "ConfigService.DeleteProvider": ADMIN,
    "ConfigService.DeleteWorkspaceTemplate": ADMIN,
    "ConfigService.GetModelConfig": ANY,
    "ConfigService.GetProvider": ADMIN_OR_SERVICE,
    "ConfigService.GetProviderCredentials": INFERENCE,
    "ConfigService.GetSystemPrompt": ANY,
    "ConfigService.GetUserPrompt": ANY,
    "ConfigService.GetWorkspaceTemplate": ANY,
    "ConfigService.ListModelConfigs": ANY,
    "ConfigService.ListProviders": ADMIN_OR_SERVICE,
    "ConfigService.ListWorkspaceTemplates": ANY,
    "ConfigService.ResolveModel": ANY,
    "ConfigService.RotateEncryptionKey": ADMIN,
    "ConfigService.SetDefaultModelConfig": ADMIN,
    "ConfigService.UpdateModelConfig": ADMIN,
    "ConfigService.UpdateProvider": ADMIN,
    "ConfigService.UpdateSystemPrompt": ADMIN,
    "ConfigService.UpdateUserPrompt": USER,
    "ConfigService.UpdateWorkspaceTemplate": ADMIN,
    "InferenceService.Generate": ADMIN_OR_SERVICE,
    "InferenceService.ListProviderModels": ADMIN_OR_SERVICE,
    "TokenService.ListRevokedTokens": ADMIN_OR_SERVICE,
    "TokenService.RevokeToken": ADMIN,
    "ToolExecService.CallTool": ANY,
    "ToolExecService.CreateWorkspace": ANY,
    "ToolExecService.DeleteWorkspace": ANY,
    "ToolExecService.GetWorkspace": ANY,
    "ToolExecService.ListTools": ANY,
    "ToolExecService.ListWorkspaces": ANY,
    "ToolExecService.RotateWorkspaceAgentToken": ANY,
    "WorkspaceAgentService.Connect": AGENT,
}
# Who is refused, by rule, and with which reasons.
REFUSED: dict[str, dict[str, set[str]]] = {
    ANY: {},
    AGENT: {},
    USER: {"bare service": {"USER_REQUIRED"}},
    ADMIN: {"user": {"ADMIN_REQUIRED"}, "service": {"ADMIN_REQUIRED"}},
    ADMIN_OR_SERVICE: {"user": {"ADMIN_REQUIRED", "SERVICE_OR_ADMIN_REQUIRED"}},
    INFERENCE: {"user": {"SERVICE_REQUIRED"}, "admin": {"SERVICE_REQUIRED"}, "service": {"SERVICE_REQUIRED"}},
    TOOLEXEC: {"user": {"SERVICE_REQUIRED"}, "admin": {"SERVICE_REQUIRED"}, "service": {"SERVICE_REQUIRED"}},
}
ROLE_CALLERS = {
    "user": ("alice", "user", ""),
    "admin": ("admin", "admin", ""),
    # A service other than the one an RPC is reserved for, acting for nobody.
    "service": ("service:chat", "service", ""),
    "bare service": ("service:inference", "service", ""),
}


def test_access_table_is_complete() -> None:
    assert set(ACCESS) == {t.name for t in ALL_RPCS}, "list every RPC's callers in ACCESS"


@pytest.mark.parametrize("target", [t for t in ALL_RPCS if REFUSED[ACCESS[t.name]]], ids=lambda t: t.name)
async def test_callers_without_the_role_are_refused(world: World, target: Rpc) -> None:
    for caller, reasons_wanted in REFUSED[ACCESS[target.name]].items():
        subject, role, acting = ROLE_CALLERS[caller]
        what = f"{target.name} as {caller} ({subject})"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await invoke(
                world.channel(target.server),
                target,
                target.request_class(),
                world.metadata(subject, role, acting),
            )
        info = check_error(caught.value, what)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, f"{what}: {caught.value.code().name}"
        assert info.reason in reasons_wanted, f"{what}: {info.reason}, expected one of {reasons_wanted}"


# --- cross-user -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Bob's attempt at something of alice's: the RPC and the request, built from the world."""

    rpc: str
    build: Callable[[World], Message]
    label: str = ""


def _cases() -> list[Case]:
    c = chat_service_pb2
    t = toolexec_service_pb2
    cfg = config_service_pb2

    def a(w: World) -> UserData:
        return w.users["alice"]

    def b(w: World) -> UserData:
        return w.users["bob"]

    return [
        Case("ChatService.GetChat", lambda w: c.GetChatRequest(chat_id=a(w).chat_id)),
        Case(
            "ChatService.UpdateChat",
            lambda w: c.UpdateChatRequest(
                chat=chat_pb2.Chat(id=a(w).chat_id, title="bob was here", archived=True),
                update_mask=field_mask_pb2.FieldMask(paths=["title", "archived"]),
            ),
        ),
        Case("ChatService.DeleteChat", lambda w: c.DeleteChatRequest(chat_id=a(w).chat_id)),
        Case(
            "ChatService.SendMessage",
            lambda w: c.SendMessageRequest(
                chat_id=a(w).busy_chat_id,
                content=text("from bob"),
                busy_behavior=chat_pb2.BUSY_BEHAVIOR_INTERRUPT,
            ),
        ),
        Case(
            "ChatService.EditMessage",
            lambda w: c.EditMessageRequest(
                chat_id=a(w).chat_id, message_id=a(w).user_message_id, content=text("bob's words")
            ),
        ),
        Case(
            "ChatService.EditMessage",
            lambda w: c.EditMessageRequest(
                chat_id=b(w).chat_id, message_id=a(w).user_message_id, content=text("bob's words")
            ),
            "bob's chat, alice's message",
        ),
        Case("ChatService.ListMessages", lambda w: c.ListMessagesRequest(chat_id=a(w).chat_id)),
        Case(
            "ChatService.ListQueuedMessages", lambda w: c.ListQueuedMessagesRequest(chat_id=a(w).busy_chat_id)
        ),
        Case(
            "ChatService.DeleteQueuedMessage",
            lambda w: c.DeleteQueuedMessageRequest(
                chat_id=a(w).busy_chat_id, queued_message_id=a(w).queued_message_id
            ),
        ),
        Case(
            "ChatService.DeleteQueuedMessage",
            lambda w: c.DeleteQueuedMessageRequest(
                chat_id=b(w).busy_chat_id, queued_message_id=a(w).queued_message_id
            ),
            "bob's chat, alice's queued message",
        ),
        Case(
            "ChatService.PromoteQueuedMessage",
            lambda w: c.PromoteQueuedMessageRequest(
                chat_id=a(w).busy_chat_id, queued_message_id=a(w).queued_message_id
            ),
        ),
        Case(
            "ChatService.PromoteQueuedMessage",
            lambda w: c.PromoteQueuedMessageRequest(
                chat_id=b(w).busy_chat_id, queued_message_id=a(w).queued_message_id
            ),
            "bob's chat, alice's queued message",
        ),
        Case("ChatService.InterruptChat", lambda w: c.InterruptChatRequest(chat_id=a(w).busy_chat_id)),
        Case(
            "ChatService.ForkChat",
            lambda w: c.ForkChatRequest(chat_id=a(w).chat_id, message_id=a(w).user_message_id),
        ),
        Case(
            "ChatService.ForkChat",
            lambda w: c.ForkChatRequest(chat_id=b(w).chat_id, message_id=a(w).assistant_message_id),
            "bob's chat, alice's message",
        ),
        Case("ChatService.CompactChat", lambda w: c.CompactChatRequest(chat_id=a(w).chat_id)),
        Case("ChatService.StreamChat", lambda w: c.StreamChatRequest(chat_id=a(w).chat_id)),
        Case(
            "ChatService.CreateChat",
            lambda w: c.CreateChatRequest(
                content=text("use alice's workspace"), workspace_id=a(w).workspace_id
            ),
        ),
        Case("ChatService.GetUsage", lambda w: c.GetUsageRequest(user_id="alice")),
        Case("ToolExecService.GetWorkspace", lambda w: t.GetWorkspaceRequest(workspace_id=a(w).workspace_id)),
        Case(
            "ToolExecService.GetWorkspace",
            lambda w: t.GetWorkspaceRequest(workspace_id=a(w).workspace_id, view=t.WORKSPACE_VIEW_BASIC),
            "basic view (the cached path)",
        ),
        Case(
            "ToolExecService.DeleteWorkspace",
            lambda w: t.DeleteWorkspaceRequest(workspace_id=a(w).workspace_id),
        ),
        Case(
            "ToolExecService.CallTool",
            lambda w: t.CallToolRequest(
                workspace_id=a(w).workspace_id,
                tool_call_id=uuid.uuid4().hex,
                name="read_file",
                arguments_json='{"path": "x"}',
            ),
        ),
        Case(
            "ToolExecService.RotateWorkspaceAgentToken",
            lambda w: t.RotateWorkspaceAgentTokenRequest(workspace_id=a(w).workspace_id),
        ),
        Case(
            "ToolExecService.CreateWorkspace",
            lambda w: t.CreateWorkspaceRequest(name="mine now", owner_id="alice"),
        ),
        Case("ToolExecService.ListWorkspaces", lambda w: t.ListWorkspacesRequest(owner_id="alice")),
        Case("ConfigService.GetUserPrompt", lambda w: cfg.GetUserPromptRequest(user_id="alice")),
        Case(
            "ConfigService.GetModelConfig",
            lambda w: cfg.GetModelConfigRequest(model_config_id=w.disabled_model_id),
        ),
        Case(
            "ConfigService.GetWorkspaceTemplate",
            lambda w: cfg.GetWorkspaceTemplateRequest(workspace_template_id=w.disabled_template_id),
        ),
        Case(
            "ConfigService.GetWorkspaceTemplate",
            lambda w: cfg.GetWorkspaceTemplateRequest(workspace_template_id=w.disabled_template_name),
            "by name",
        ),
    ]


CASES = _cases()
# RPCs whose requests name ids but nothing a user owns, or that no user may call at all (the role
# test covers those): why each is not in CASES.
NOT_USER_OWNED = {
    "AgentRelayService.RelaySignal": "toolexec replicas only",
    "AgentRelayService.RelayToolCall": "toolexec replicas only",
    "ConfigService.DeleteModelConfig": "admins only",
    "ConfigService.DeleteProvider": "admins only",
    "ConfigService.DeleteWorkspaceTemplate": "admins only",
    "ConfigService.GetProvider": "admins and services only",
    "ConfigService.GetProviderCredentials": "the inference service only",
    "ConfigService.ListModelConfigs": "a listing: test_lists_show_bob_nothing_of_alices",
    "ConfigService.ResolveModel": "answers with the default: test_a_disabled_model_is_not_named_to_users",
    "ConfigService.SetDefaultModelConfig": "admins only",
    "ConfigService.UpdateModelConfig": "admins only",
    "ConfigService.UpdateProvider": "admins only",
    "ConfigService.UpdateWorkspaceTemplate": "admins only",
    "ConfigService.CreateModelConfig": "admins only",
    "ConfigService.CreateProvider": "admins only",
    "ConfigService.CreateWorkspaceTemplate": "admins only",
    "InferenceService.Generate": "admins and services only",
    "InferenceService.ListProviderModels": "admins and services only",
    "TokenService.RevokeToken": "admins only",
    "WorkspaceAgentService.Connect": "an agent token, which names its workspace itself",
}
NOT_AN_ID = ("request_id", "tool_call_id", "page_token")


def _id_fields(descriptor: Descriptor, depth: int = 0) -> list[str]:
    out: list[str] = []
    for field in descriptor.fields:
        if field.message_type is not None and depth < 2:
            out += [f"{field.name}.{n}" for n in _id_fields(field.message_type, depth + 1)]
        elif field.type == field.TYPE_STRING and (field.name == "id" or field.name.endswith("_id")):
            if field.name not in NOT_AN_ID:
                out.append(field.name)
    return out


def test_every_rpc_that_takes_an_id_is_in_the_matrix() -> None:
    takes_ids = {t.name for t in ALL_RPCS if _id_fields(t.method.input_type)}
    covered = {case.rpc for case in CASES} | set(NOT_USER_OWNED)
    assert takes_ids <= covered, f"RPCs taking ids missing from CASES: {sorted(takes_ids - covered)}"
    assert not {case.rpc for case in CASES} & set(NOT_USER_OWNED)


def _alices(world: World) -> list[str]:
    """Everything of alice's that must not reach bob: her names and texts, her ids."""
    alice = world.users["alice"]
    return [
        SECRET,
        alice.workspace_id,
        alice.chat_id,
        alice.busy_chat_id,
        alice.user_message_id,
        alice.assistant_message_id,
        alice.queued_message_id,
        world.disabled_model_name,
        world.disabled_template_name,
    ]


async def _alices_state(world: World) -> dict[str, object]:
    alice = world.users["alice"]
    stub = world.chat("alice")
    chat = (await stub.GetChat(chat_service_pb2.GetChatRequest(chat_id=alice.chat_id))).chat
    messages = await stub.ListMessages(chat_service_pb2.ListMessagesRequest(chat_id=alice.chat_id))
    queued = await stub.ListQueuedMessages(
        chat_service_pb2.ListQueuedMessagesRequest(chat_id=alice.busy_chat_id)
    )
    busy = (await stub.GetChat(chat_service_pb2.GetChatRequest(chat_id=alice.busy_chat_id))).chat
    workspace = await world.toolexec("alice").GetWorkspace(
        toolexec_service_pb2.GetWorkspaceRequest(workspace_id=alice.workspace_id)
    )
    prompt = await world.config("alice").GetUserPrompt(config_service_pb2.GetUserPromptRequest())
    return {
        "chat": (chat.title, chat.archived, chat.status, chat.last_seq),
        "messages": [(m.id, str(m.parts)) for m in messages.messages],
        "queued": [q.id for q in queued.queued_messages],
        "busy": (busy.status, busy.queued_message_count),
        "workspace": (workspace.workspace.name, workspace.workspace.owner_id),
        "prompt": prompt.user_prompt.text,
    }


@pytest.mark.parametrize(
    "caller", [("bob", "user", ""), ("service:chat", "service", "bob")], ids=["bob", "chat-acting-for-bob"]
)
async def _answer(world: World, target: Rpc, request: Message, caller: tuple[str, str, str]) -> str:
    """What a call tells its caller, for comparison: OK, or the status code and reason."""
    try:
        await invoke(world.channel(target.server), target, request, world.metadata(*caller))
    except grpc.aio.AioRpcError as exc:
        info = error_info(exc)
        return f"{exc.code().name} {info.reason if info else ''}"
    return "OK"


def _twin(world: World, request: Message) -> Message:
    """`request` with each of alice's ids replaced by a fresh id of the same form, never issued."""
    wire = text_format.MessageToString(request)
    alice = world.users["alice"]
    for value in (alice.chat_id, alice.busy_chat_id, alice.user_message_id, alice.assistant_message_id,
                  alice.queued_message_id, world.disabled_model_id, world.disabled_template_id):  # fmt: skip
        wire = wire.replace(value, str(uuid.uuid4()))
    wire = wire.replace(alice.workspace_id, "ws_" + uuid.uuid4().hex[:20])
    return text_format.Parse(wire, type(request)())


@pytest.mark.parametrize(
    "caller", [("bob", "user", ""), ("service:chat", "service", "bob")], ids=["bob", "chat-acting-for-bob"]
)
async def test_bob_cannot_reach_alices_things(world: World, caller: tuple[str, str, str]) -> None:
    before = await _alices_state(world)
    failures: list[str] = []
    for case in CASES:
        target = rpc(case.rpc)
        request = case.build(world)
        what = f"{case.rpc}{f' ({case.label})' if case.label else ''} as {caller[0]}"
        # What bob is told about alice's things is what he is told about things that never were:
        # the answer gives away neither their contents nor their existence.
        twin = await _answer(world, target, _twin(world, request), caller)
        try:
            await invoke(world.channel(target.server), target, request, world.metadata(*caller))
        except grpc.aio.AioRpcError as exc:
            info = check_error(exc, what)
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                failures.append(f"{what}: {exc.code().name} {info.reason}: {exc.details()}")
            if f"{exc.code().name} {info.reason}" != twin:
                failures.append(f"{what}: {exc.code().name} {info.reason}, for ids that never were {twin}")
            told = " ".join([exc.details() or "", *info.metadata.values()])
            leaked = [s for s in _alices(world) if s and s in told and s not in str(request)]
            if leaked:
                failures.append(f"{what}: the error names {leaked}: {told}")
            continue
        # Only an idempotent delete answers OK: the same as for an id that never was (and the
        # state check below shows it deleted nothing).
        if not (target.method.name.startswith("Delete") and twin == "OK"):
            failures.append(f"{what}: succeeded")
    assert not failures, "\n".join(failures)
    assert await _alices_state(world) == before, "bob's attempts changed alice's data"


async def test_lists_show_bob_nothing_of_alices(world: World) -> None:
    alice = world.users["alice"]
    bob = world.users["bob"]
    chats = await world.chat("bob").ListChats(chat_service_pb2.ListChatsRequest(page_size=500))
    archived = await world.chat("bob").ListChats(chat_service_pb2.ListChatsRequest(archived=True))
    ids = {c.id for c in [*chats.chats, *archived.chats]}
    assert bob.chat_id in ids and alice.chat_id not in ids and alice.busy_chat_id not in ids
    workspaces = await world.toolexec("bob").ListWorkspaces(toolexec_service_pb2.ListWorkspacesRequest())
    assert {w.id for w in workspaces.workspaces} == {bob.workspace_id}
    usage = await world.chat("bob").GetUsage(chat_service_pb2.GetUsageRequest())
    assert alice.chat_id not in str(usage)
    models = await world.config("bob").ListModelConfigs(
        config_service_pb2.ListModelConfigsRequest(include_disabled=True)
    )
    assert world.disabled_model_id not in {m.id for m in models.model_configs}
    templates = await world.config("bob").ListWorkspaceTemplates(
        config_service_pb2.ListWorkspaceTemplatesRequest(include_disabled=True)
    )
    assert world.disabled_template_id not in {t.id for t in templates.workspace_templates}


async def test_a_disabled_model_is_not_named_to_users(world: World) -> None:
    resolved = await world.config("bob").ResolveModel(
        config_service_pb2.ResolveModelRequest(model_config_id=world.disabled_model_id)
    )
    assert resolved.fell_back_to_default and resolved.model_config.id == world.model_id
    assert SECRET not in resolved.fallback_reason, resolved.fallback_reason
    # The same answer for an id that never existed: a user cannot tell a disabled model exists.
    unknown = str(uuid.uuid4())
    other = await world.config("bob").ResolveModel(
        config_service_pb2.ResolveModelRequest(model_config_id=unknown)
    )
    assert other.fallback_reason.replace(unknown, "X") == resolved.fallback_reason.replace(
        world.disabled_model_id, "X"
    )


async def test_bobs_watch_sees_none_of_alices_changes(world: World) -> None:
    alice = world.users["alice"]
    bob = world.users["bob"]
    seen: list[str] = []
    call = world.chat("bob").WatchChats(chat_service_pb2.WatchChatsRequest())

    async def rename(user: str, chat_id: str, title: str) -> None:
        await world.chat(user).UpdateChat(
            chat_service_pb2.UpdateChatRequest(
                chat=chat_pb2.Chat(id=chat_id, title=title),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            )
        )

    async def read() -> None:
        async for change in call:
            seen.append(change.chat.id)

    renames = 0

    async def probe() -> bool:
        nonlocal renames
        renames += 1
        await rename("bob", bob.chat_id, f"bob probe {renames}")
        return bob.chat_id in seen

    reader = asyncio.create_task(read())
    try:
        # Bob's own rename shows once his watch is live; alice's rename then goes between two of his,
        # and the watch delivers in order, so hers would have arrived before his second one.
        await wait_until(probe, what="bob's watch to report his own rename")
        await rename("alice", alice.chat_id, f"alice {SECRET} renamed")
        before = seen.count(bob.chat_id)
        await rename("bob", bob.chat_id, "bob after alice")
        await wait_until(lambda: seen.count(bob.chat_id) > before, what="bob's rename after alice's")
        assert alice.chat_id not in seen and alice.busy_chat_id not in seen, seen
    finally:
        call.cancel()
        reader.cancel()
