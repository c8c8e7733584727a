"""Whatever a model puts in a tool call, the answer is a tool result, never a failed call or run.

A model writes the tool name and `arguments_json` itself, and nothing stops it writing invalid
JSON, JSON that is not an object, wrong types, unknown properties, huge or deeply nested values,
escaped NULs, or a tool that does not exist. Here those go

- straight to the real toolexec's CallTool in a real (sandboxed) workspace: each answer is a
  CallToolResponse, an error result (`is_error`, a message) whenever the arguments are not a JSON
  object or the tool is unknown, and the workspace's agent keeps serving;
- through the agent loop (tests/chat/loopkit.py's FakeModel emitting them) with the real toolexec
  behind it: the run records a result for every call and ends WAITING, not ERROR;
- through the whole stack (the simulator's model emits them, chat, inference, toolexec, Postgres):
  the chat finishes its turn with an error result per bad call stored and shown.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc.aio
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.chat.clients import ToolExecTools
from services.common.client import create_channel
from services.common.settings import Settings
from services.simulator.script import Script
from services.toolexec.tools.definitions import TOOLS
from tests.chat.loopkit import Call, FakeModel, LoopKit, Text
from tests.helpers import wait_until
from tests.hostile.strategies import json_texts, json_values
from tests.hostile.world import World, start_world, text

EXAMPLES = int(os.environ.get("AGENTPLANE_FUZZ_EXAMPLES", "40"))
RANDOM = os.environ.get("AGENTPLANE_FUZZ_RANDOM", "") == "1"
TOOL_NAMES = [t.name for t in TOOLS]
NUL = "\x00"
UNKNOWN_NAMES = ["no_such_tool", "EXECUTE", "read_file ", "../execute", "x" * 128, "ツール"]
# Tools that only read or answer at once: a generated call to one of these never starts anything
# that outlives it. execute and process_* run arbitrary commands and are exercised with arguments
# that fail validation (wrong types) or by the fixed cases below, where what runs is known.
SAFE_TO_RUN = {"read_file", "write_file", "edit_files", "process_list", "process_output", "process_signal"}
# The request's bound on one call: a generated call that somehow runs long ends here.
CALL_TIMEOUT = duration_pb2.Duration(seconds=5)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@dataclass
class Tools:
    """The module's deployment, alice's sandboxed workspace, and a ToolExecService stub as alice."""

    world: World
    workspace_id: str
    stub: toolexec_service_pb2_grpc.ToolExecServiceStub

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints with this
        printer.text(f"Tools({self.world!r}, {self.workspace_id})")


@pytest.fixture(scope="module")
async def tools(
    module_settings: Settings, make_token: Callable[..., str], module_workspaces_dir: str
) -> AsyncIterator[Tools]:
    world = await start_world(
        module_settings, make_token, module_workspaces_dir, default_driver="local", seed_users=False
    )
    try:
        stub = world.toolexec("alice")
        created = await stub.CreateWorkspace(toolexec_service_pb2.CreateWorkspaceRequest(name="tools"))
        await world.agent_connected("alice", created.workspace.id)
        yield Tools(world, created.workspace.id, stub)
    finally:
        await world.stop()


def _wrong_types(name: str) -> st.SearchStrategy[str]:
    """A JSON object over the tool's own property names (and others) with values of any type."""
    spec = next((t for t in TOOLS if t.name == name), None)
    props = list(json.loads(spec.schema_json).get("properties", {})) if spec else []
    keys = st.sampled_from(props or ["path"]) | st.text(max_size=8)
    huge = st.integers(100_000, 1_000_000).map(lambda n: "y" * n)
    return st.dictionaries(keys, json_values() | huge, max_size=5).map(json.dumps)


WRONG_COMMANDS: list[Any] = [1, None, [], {}, True, 1.5]


def _arguments(name: str) -> st.SearchStrategy[str]:
    if name in TOOL_NAMES and name not in SAFE_TO_RUN:
        # Never a valid call of a command-running tool: its required "command"/"process_id" is
        # there with a value of the wrong type, or missing.
        return st.one_of(
            json_texts().filter(lambda s: not _is_object(s)),
            st.dictionaries(st.text(max_size=8), json_values(), max_size=4)
            .map(lambda d: {k: v for k, v in d.items() if k not in ("command", "process_id")})
            .map(json.dumps),
            st.sampled_from([json.dumps({"command": v}) for v in WRONG_COMMANDS]),
        )
    return st.one_of(json_texts(), _wrong_types(name))


def _is_object(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments.strip() or "{}"), dict)
    except (ValueError, RecursionError):
        return False


@FUZZ
@given(data=st.data())
async def test_any_arguments_get_a_tool_result(tools: Tools, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(TOOL_NAMES + UNKNOWN_NAMES), label="name")
    arguments = data.draw(_arguments(name), label="arguments")
    request = toolexec_service_pb2.CallToolRequest(
        workspace_id=tools.workspace_id,
        tool_call_id=f"fuzz-{uuid.uuid4().hex}",
        name=name,
        arguments_json=arguments,
        timeout=CALL_TIMEOUT,
    )
    try:
        resp = await tools.stub.CallTool(request, timeout=90)
    except grpc.aio.AioRpcError as exc:
        # The one documented refusal of a well-addressed call: a NUL character in any request
        # string (services/common/nul_guard.py). No valid JSON holds a raw one.
        refused = exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "arguments_json" in (exc.details() or "")
        if NUL in arguments and refused:
            return
        raise AssertionError(
            f"CallTool({name}) failed as an RPC: {exc.code().name} {exc.details()}"
        ) from None
    if resp.is_error:
        assert resp.content.strip(), f"an error result of {name} without a message"
    if name not in TOOL_NAMES or not _is_object(arguments):
        assert resp.is_error, f"{name}({arguments[:200]!r}) was not an error: {resp.content[:300]}"
    if resp.structured_json:
        json.loads(resp.structured_json)


async def test_the_agent_still_serves_after_the_fuzz(tools: Tools) -> None:
    # Runs after the property above in this module: the same workspace answers a plain call.
    resp = await tools.stub.CallTool(
        toolexec_service_pb2.CallToolRequest(
            workspace_id=tools.workspace_id,
            tool_call_id=uuid.uuid4().hex,
            name="execute",
            arguments_json=json.dumps({"command": "echo still-here"}),
            timeout=CALL_TIMEOUT,
        ),
        timeout=60,
    )
    assert not resp.is_error and "still-here" in resp.content, resp.content


@settings(FUZZ, max_examples=max(5, EXAMPLES // 4))
@given(data=st.data())
async def test_the_loop_records_a_result_for_every_generated_call(tools: Tools, data: st.DataObject) -> None:
    names = st.sampled_from(TOOL_NAMES + UNKNOWN_NAMES)
    calls = data.draw(
        st.lists(names.flatmap(lambda n: _arguments(n).map(lambda a: (n, a))), min_size=1, max_size=4),
        label="calls",
    )
    channel = create_channel(
        tools.world.address("toolexec"), token=tools.world.make_token("service:chat", "service")
    )
    try:
        kit = LoopKit(
            model=FakeModel([Call(n, a) for n, a in calls], [Text("done")]),
            tools=ToolExecTools(channel, call_timeout_seconds=5),  # type: ignore[arg-type]  # real, not fake
        )
        chat_id = kit.create_chat("go", workspace_id=tools.workspace_id)
        await kit.run(chat_id, within=120)
    finally:
        await channel.close()
    assert kit.store.statuses(chat_id)[-1] == "waiting", kit.store.statuses(chat_id)
    results = [
        p.tool_result
        for m in kit.store.messages(chat_id)
        if m.role == chat_pb2.MESSAGE_ROLE_TOOL
        for p in m.parts
        if p.HasField("tool_result")
    ]
    assert len(results) == len(calls), [r.tool_call_id for r in results]
    for (name, arguments), result in zip(calls, results, strict=True):
        if name not in TOOL_NAMES or not _is_object(arguments):
            assert result.is_error and result.content.strip(), (name, arguments[:200], result.content[:300])


# Fixed nasty calls through the whole stack; the simulator's script sends each arguments string raw.
NASTY: list[tuple[str, Any]] = [
    ("read_file", "{"),
    ("read_file", "[]"),
    ("read_file", "null"),
    ("read_file", '{"path": 5}'),
    ("read_file", '{"path": "a\\u0000b"}'),
    # The simulator sends this as the JSON escape, so the provider's SDK hands over a raw NUL.
    ("read_file", '{"path": "a' + NUL + 'b"}'),
    ("write_file", json.dumps({"path": "big.txt", "content": "z" * 300_000})),
    ("execute", '{"command": ["ls"]}'),
    ("execute", "[" * 100_000),
    ("no_such_tool", "{}"),
    ("edit_files", '{"edits": "everything"}'),
]


async def test_a_chat_survives_a_model_that_calls_tools_with_garbage(tools: Tools) -> None:
    world = tools.world
    # The text says something with a NUL in it too: the stored message keeps it readable.
    turns = [
        {"text": f"calling{NUL}now", "tool_calls": [{"name": n, "arguments": a} for n, a in NASTY]},
        {"text": "all done"},
    ]
    world.sim.set_script(Script.from_data({"conversations": [{"match": "garbage", "turns": turns}]}))
    stub = world.chat("alice")
    created = await stub.CreateChat(
        chat_service_pb2.CreateChatRequest(content=text("garbage please"), workspace_id=tools.workspace_id)
    )
    chat = await wait_until(
        lambda: stub.GetChat(chat_service_pb2.GetChatRequest(chat_id=created.chat.id)),
        until=lambda r: r.chat.status in (chat_pb2.CHAT_STATUS_WAITING, chat_pb2.CHAT_STATUS_ERROR),
        what="the chat to finish its turn",
        timeout=60,
    )
    assert chat.chat.status == chat_pb2.CHAT_STATUS_WAITING, chat.chat.last_error
    listed = await stub.ListMessages(chat_service_pb2.ListMessagesRequest(chat_id=created.chat.id))
    results = [p.tool_result for m in listed.messages for p in m.parts if p.HasField("tool_result")]
    by_call = {r.tool_call_id: r for r in results}
    calls = [p.tool_call for m in listed.messages for p in m.parts if p.HasField("tool_call")]
    assert len(calls) == len(NASTY) and set(by_call) == {c.id for c in calls}, (len(calls), len(results))
    for call, (name, _) in zip(calls, NASTY, strict=True):
        result = by_call[call.id]
        if name != "write_file":
            assert result.is_error and result.content.strip(), (name, result.content[:300])
    said = "".join(p.text.text for p in listed.messages[1].parts if p.HasField("text"))
    assert said == "calling\ufffdnow", listed.messages[1]
    assert listed.messages[-1].role == chat_pb2.MESSAGE_ROLE_ASSISTANT
    assert "all done" in str(listed.messages[-1].parts)
