"""Every RPC of every service, called with generated requests by every kind of caller.

The requests are built from the descriptors (tests/hostile/strategies.py): a new RPC or field is
covered without a change here, and `test_every_declared_rpc_is_served_and_fuzzed` fails when the
API and what the servers serve part ways. Whatever the request and the caller (alice, bob, an
admin, the chat service acting for alice, bare inference and toolexec identities, a garbage
token), the answer is a success or a well-formed error (`rpcs.check_error`: never INTERNAL or
UNKNOWN, always an ErrorInfo from the ErrorReason enums with a message), and the server still
answers its health check afterwards.

Examples per RPC: `FUZZ_EXAMPLES` (``AGENTPLANE_FUZZ_EXAMPLES`` overrides it). The examples are
derived from the test's name, so CI runs the same ones every time; ``AGENTPLANE_FUZZ_RANDOM=1``
draws new ones on each run (with the seed to reproduce a failure printed by hypothesis).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from agentplane.toolexec.v1 import toolexec_service_pb2, workspace_agent_service_pb2
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.common import auth
from services.common.server import MAX_MESSAGE_BYTES
from tests.hostile.rpcs import ALL_RPCS, Rpc, assert_serving, check_error, invoke
from tests.hostile.strategies import Fuzzer
from tests.hostile.world import SERVICES, World

FUZZ_EXAMPLES = int(os.environ.get("AGENTPLANE_FUZZ_EXAMPLES", "40"))
RANDOM = os.environ.get("AGENTPLANE_FUZZ_RANDOM", "") == "1"
# Who calls: (subject, role, acting for). Every RPC meets every one of them.
CALLERS: dict[str, tuple[str, str, str]] = {
    "alice": ("alice", "user", ""),
    "bob": ("bob", "user", ""),
    "admin": ("admin", "admin", ""),
    "chat-for-alice": ("service:chat", "service", "alice"),
    "inference": ("service:inference", "service", ""),
    "toolexec": ("service:toolexec", "service", ""),
}
NOT_SERVED = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


PAGED = [t for t in ALL_RPCS if {"page_token", "page_size"} <= set(t.method.input_type.fields_by_name)]
# Page tokens no server wrote: digits that are not ASCII, far too many of them, broken base64,
# and JSON (padded or not) with the keys the services' tokens use and values of the wrong kind.
ODD_PAYLOADS: list[object] = [
    {},
    [],
    {"s": 1e300},
    {"s": 10**21},
    {"o": -1},
    {"o": 10**30},
    {"u": "9999-12-31T23:59:59", "i": "00000000-0000-0000-0000-000000000000"},
    {"u": 5, "i": None},
    {"k": "providers", "p": ["x", "y"]},
    {"k": "templates:0", "p": [None]},
    {"k": "models::0", "p": ["2020-01-01T00:00:00+00:00", "not-a-uuid"]},
    {"o": "alice", "t": "x", "i": 1},
    {"o": "alice", "t": "2020-01-01T00:00:00+00:00", "i": "\u0000"},
    {"o": "alice", "t": "2020-01-01T00:00:00+00:00", "i": {"a": 1}},
    {"k": "templates:0", "p": ["\u0000"]},
    {"u": "2020-01-01T00:00:00+00:00", "i": "\u0000"},
]
ODD_PAGE_TOKENS = [
    "o\u00b2",
    "o\u0663",
    "o" + "9" * 5000,
    "o-1",
    "!!!",
    "AAAA",  # three NUL bytes
    "A000A000A00A",
    *(
        encoded
        for payload in ODD_PAYLOADS
        for encoded in {
            base64.urlsafe_b64encode(json.dumps(payload).encode()).decode(),
            base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("="),
        }
    ),
]


def _paged_request(world: World, target: Rpc, **fields: object) -> Message:
    """A request of a List RPC on the world's data (the ids it needs filled in)."""
    request = target.request_class(**fields)
    names = target.method.input_type.fields_by_name
    for name, value in (("chat_id", world.users["alice"].busy_chat_id), ("provider_id", world.provider_id)):
        if name in names:
            setattr(request, name, value)
    return request


async def _page_tokens(world: World) -> list[str]:
    """Real next-page tokens of every List RPC that gives one on a page of one item."""
    tokens: list[str] = []
    for target in PAGED:
        for caller in ("admin", "alice", "chat-for-alice"):
            request = _paged_request(world, target, page_size=1)
            subject, role, acting = CALLERS[caller]
            try:
                [response] = await invoke(
                    world.channel(target.server), target, request, world.metadata(subject, role, acting)
                )
            except grpc.aio.AioRpcError:
                continue
            token = getattr(response, "next_page_token", "")
            if token:
                tokens.append(token)
    return tokens


@pytest.fixture(scope="module")
async def fuzzer(world: World) -> AsyncIterator[Fuzzer]:
    """Strategies over the world's ids and real page tokens."""
    # A second workspace, so ListWorkspaces has a second page too.
    alice = world.users["alice"]
    await world.toolexec("alice").CreateWorkspace(toolexec_service_pb2.CreateWorkspaceRequest(name="second"))
    yield Fuzzer([*world.known_strings(), alice.chat_title], await _page_tokens(world))


def _listed_services(response: reflection_pb2.ServerReflectionResponse) -> set[str]:
    return {s.name for s in response.list_services_response.service}


async def test_every_declared_rpc_is_served_and_fuzzed(world: World) -> None:
    # Each server serves exactly the services the protos assign it (asked over reflection), and the
    # fuzz below is parametrized over every method of them.
    declared: dict[str, set[str]] = {name: set() for name in SERVICES}
    for target in ALL_RPCS:
        declared[target.server].add(target.service)
    every: set[str] = set()
    for name in SERVICES:
        stub = reflection_pb2_grpc.ServerReflectionStub(world.channel(name))
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=world.metadata("admin", "admin"),
        )
        served = set()
        async for response in call:
            served = _listed_services(response) - set(NOT_SERVED)
            break
        call.cancel()
        assert served == declared[name], (
            f"{name} serves {sorted(served)}, the protos say {sorted(declared[name])}"
        )
        for service in served:
            methods = descriptor_pool.Default().FindServiceByName(service).methods
            every |= {f"/{service}/{m.name}" for m in methods}
    fuzzed = {t.path for t in ALL_RPCS}
    assert fuzzed == every, (
        f"served, not fuzzed: {sorted(every - fuzzed)}; not served: {sorted(fuzzed - every)}"
    )


def _metadata(world: World, caller: str, garbage: str) -> list[tuple[str, str]]:
    if caller == "garbage":
        return [(auth.AUTHORIZATION_METADATA_KEY, f"Bearer {garbage}")]
    subject, role, acting = CALLERS[caller]
    return world.metadata(subject, role, acting)


@pytest.mark.parametrize("target", PAGED, ids=lambda t: t.name)
async def test_every_list_takes_any_page_token(world: World, target: Rpc) -> None:
    # The tokens above on every paginated RPC, by callers that get past its authorization.
    for token in ODD_PAGE_TOKENS:
        for caller in ("admin", "alice", "chat-for-alice"):
            request = _paged_request(world, target, page_token=token)
            try:
                await invoke(world.channel(target.server), target, request, _metadata(world, caller, ""))
            except grpc.aio.AioRpcError as exc:
                check_error(exc, f"{target.name} as {caller} with page token {token[:20]!r}")


@pytest.mark.parametrize("target", ALL_RPCS, ids=lambda t: t.name)
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(data=st.data())
async def test_any_request_gets_an_answer_or_a_clean_error(
    world: World, fuzzer: Fuzzer, target: Rpc, data: st.DataObject
) -> None:
    request: Message = data.draw(fuzzer.message(target.method.input_type), label="request")
    assume(request.ByteSize() < MAX_MESSAGE_BYTES // 2)
    caller = data.draw(st.sampled_from([*CALLERS, "garbage"]), label="caller")
    printable = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
    garbage = data.draw(st.text(printable, max_size=40), label="token") if caller == "garbage" else ""
    channel = world.channel(target.server)
    try:
        await invoke(channel, target, request, _metadata(world, caller, garbage))
    except grpc.aio.AioRpcError as exc:
        check_error(exc, f"{target.name} as {caller}")
    await assert_serving(channel, f"{target.server} after {target.name}")


@pytest.fixture(scope="module")
async def agent(world: World) -> tuple[str, str]:
    """An external workspace of bob's and its agent token: (workspace id, token)."""
    created = await world.toolexec("bob").CreateWorkspace(
        toolexec_service_pb2.CreateWorkspaceRequest(name="agent fuzz", driver="external")
    )
    return created.workspace.id, created.agent_token


@settings(
    max_examples=max(5, FUZZ_EXAMPLES // 3),
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
async def test_an_agent_with_its_token_and_any_first_message(
    world: World, fuzzer: Fuzzer, agent: tuple[str, str], data: st.DataObject
) -> None:
    # Past the token check: the agent's first message decides (hello first, for its own workspace,
    # within the hello's limits). A valid hello is welcomed; the stream is then closed.
    workspace_id, token = agent
    target = next(t for t in ALL_RPCS if t.name == "WorkspaceAgentService.Connect")
    first = data.draw(fuzzer.message(workspace_agent_service_pb2.ConnectRequest.DESCRIPTOR), label="first")
    assert isinstance(first, workspace_agent_service_pb2.ConnectRequest)
    if data.draw(st.booleans(), label="a hello for its own workspace"):
        first.hello.workspace_id = workspace_id
    channel = world.channel("toolexec")
    metadata = [(auth.AUTHORIZATION_METADATA_KEY, f"Bearer {token}")]
    try:
        await invoke(channel, target, first, metadata, refusal_window=0)
    except grpc.aio.AioRpcError as exc:
        check_error(exc, "Connect with a valid agent token")
    await assert_serving(channel, "toolexec after an agent's first message")
