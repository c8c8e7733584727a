"""The tool-call ledger: replay without re-running, refusal of a reused id, interrupted calls."""

from __future__ import annotations

import asyncio
import json

import psycopg

from services.toolexec.ledger import call_fingerprint
from tests.toolexec.conftest import Toolexec, call_request, ws_read


async def test_execute_replay_does_not_run_again(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    request = call_request(ws, "execute", {"command": "echo ran >> count.txt; wc -l < count.txt"}, "call-1")
    first = await stub.CallTool(request)
    assert not first.replayed and json.loads(first.structured_json)["output"].strip() == "1"
    again = await stub.CallTool(request)
    assert again.replayed
    assert again.content == first.content and again.structured_json == first.structured_json
    assert ws_read(toolexec, ws, "count.txt") == "ran\n"
    # Whitespace and key order in the JSON do not make it a different call.
    reordered = call_request(
        ws, "execute", '{ "command" : "echo ran >> count.txt; wc -l < count.txt" }', "call-1"
    )
    assert (await stub.CallTool(reordered)).replayed
    assert ws_read(toolexec, ws, "count.txt") == "ran\n"


async def test_reused_id_with_other_arguments_is_refused(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    await stub.CallTool(call_request(ws, "write_file", {"path": "a.txt", "content": "one"}, "call-x"))
    other = await stub.CallTool(call_request(ws, "write_file", {"path": "a.txt", "content": "two"}, "call-x"))
    assert other.is_error and not other.replayed
    assert (
        "already used" in other.content
        and json.loads(other.structured_json)["error"] == "tool_call_id_reused"
    )
    other_tool = await stub.CallTool(call_request(ws, "read_file", {"path": "a.txt"}, "call-x"))
    assert other_tool.is_error and "already used" in other_tool.content
    assert ws_read(toolexec, ws, "a.txt") == "one"
    # The recorded result is still replayed for the original call.
    replay = await stub.CallTool(
        call_request(ws, "write_file", {"path": "a.txt", "content": "one"}, "call-x")
    )
    assert replay.replayed and not replay.is_error


async def test_ids_are_scoped_to_their_workspace(toolexec: Toolexec) -> None:
    a, b = await toolexec.create(name="a"), await toolexec.create(name="b")
    stub = toolexec.stub()
    for ws in (a, b):
        r = await stub.CallTool(call_request(ws, "write_file", {"path": "f", "content": ws}, "same-id"))
        assert not r.replayed
    assert ws_read(toolexec, b, "f") == b


async def test_bad_calls_are_error_results_and_recorded(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    unknown = await stub.CallTool(call_request(ws, "rm_rf", {}, "bad-1"))
    assert unknown.is_error and "unknown tool 'rm_rf'" in unknown.content and "read_file" in unknown.content
    bad_json = await stub.CallTool(call_request(ws, "execute", "{command: ls", "bad-2"))
    assert (
        bad_json.is_error
        and "not valid JSON" in bad_json.content
        and "execute(command: string" in bad_json.content
    )
    not_object = await stub.CallTool(call_request(ws, "execute", "[1]", "bad-3"))
    assert not_object.is_error and "must be a JSON object" in not_object.content
    wrong_type = await stub.CallTool(call_request(ws, "read_file", {"path": 3, "extra": 1}, "bad-4"))
    assert wrong_type.is_error and "path: 3 is not of type 'string'" in wrong_type.content
    assert "Additional properties are not allowed ('extra'" in wrong_type.content
    assert (await stub.CallTool(call_request(ws, "rm_rf", {}, "bad-1"))).replayed


async def test_concurrent_duplicates_run_once(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    request = call_request(ws, "execute", {"command": "sleep 0.3; echo x >> dup.txt"}, "dup")
    results = await asyncio.gather(*(stub.CallTool(request) for _ in range(5)))
    assert sum(not r.replayed for r in results) == 1
    assert ws_read(toolexec, ws, "dup.txt") == "x\n"


async def test_started_row_is_answered_by_the_agent_once(toolexec: Toolexec, database_url: str) -> None:
    """A 'started' row left by a toolexec killed mid-call is sent to the agent again under the
    same id: a call the agent never got runs (once); a call it ran is answered from its record."""
    ws = await toolexec.create()
    stub = toolexec.stub()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # Cut before the agent got it: a 'started' row and nothing in the agent's record.
        args = json.dumps({"command": "echo never-got >> side_effect.txt"})
        await conn.execute(
            "INSERT INTO toolexec_tool_calls (workspace_id, tool_call_id, tool_name, "
            "arguments_sha256, state, instance_id) "
            "VALUES (%s, 'cut', 'execute', %s, 'started', 'dead-instance')",
            (ws, call_fingerprint("execute", args)),
        )
        r = await stub.CallTool(call_request(ws, "execute", args, "cut"))
        assert not r.is_error and r.replayed
        again = await stub.CallTool(call_request(ws, "execute", args, "cut"))
        assert again.replayed and again.content == r.content
        # Cut after the agent ran it: the row goes back to 'started', as if toolexec died
        # between the agent's result and the ledger's complete.
        args2 = json.dumps({"command": "echo ran >> side_effect.txt"})
        first = await stub.CallTool(call_request(ws, "execute", args2, "ran"))
        await conn.execute(
            "UPDATE toolexec_tool_calls SET state = 'started', content = NULL "
            "WHERE workspace_id = %s AND tool_call_id = 'ran'",
            (ws,),
        )
        retried = await stub.CallTool(call_request(ws, "execute", args2, "ran"))
        assert retried.replayed and retried.content == first.content
        cur = await conn.execute(
            "SELECT tool_call_id, state FROM toolexec_tool_calls WHERE workspace_id = %s", (ws,)
        )
        assert all(state == "completed" for _, state in await cur.fetchall())
    # Each ran exactly once.
    assert ws_read(toolexec, ws, "side_effect.txt") == "never-got\nran\n"


async def test_read_only_call_is_recorded_once_and_replayed(toolexec: Toolexec, database_url: str) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    await stub.CallTool(call_request(ws, "write_file", {"path": "n.txt", "content": "first\n"}))
    read = call_request(ws, "read_file", {"path": "n.txt"}, "read-1")
    first = await stub.CallTool(read)
    assert not first.replayed and "first" in first.content
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT state, content FROM toolexec_tool_calls"
            " WHERE workspace_id = %s AND tool_call_id = 'read-1'",
            (ws,),
        )
        assert await cur.fetchone() == ("completed", first.content)
    # The file changes, yet the same tool_call_id answers with what was recorded.
    await stub.CallTool(call_request(ws, "write_file", {"path": "n.txt", "content": "second\n"}))
    again = await stub.CallTool(read)
    assert again.replayed and again.content == first.content
    # A reused id with other arguments is still refused.
    other = await stub.CallTool(call_request(ws, "read_file", {"path": "other.txt"}, "read-1"))
    assert other.is_error and "already used" in other.content
    # Concurrent duplicates all answer with the one recorded result.
    dup = call_request(ws, "read_file", {"path": "n.txt"}, "read-2")
    results = await asyncio.gather(*(stub.CallTool(dup) for _ in range(5)))
    assert len({r.content for r in results}) == 1 and "second" in results[0].content
