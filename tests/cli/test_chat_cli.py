"""`agentplane chat`: long messages from stdin or a file; `watch --until-idle` on an idle chat
answers at once; an unreachable server is retried a bounded number of times, saying why."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.common.embedded import free_port
from services.simulator.script import Script
from tests.chat.conftest import text
from tests.cli.conftest import CLI, REPO_ROOT, CliStack, cli_env, run_cli

# Longer than one command-line argument may be on Linux (MAX_ARG_STRLEN, 128 KiB).
LONG = "".join(f"line {i}: the quick brown fox — ünïcode ✓\n" for i in range(3500))


def _message_text(message: chat_pb2.Message) -> str:
    return "".join(p.text.text for p in message.parts if p.WhichOneof("part") == "text")


async def test_long_messages_from_stdin_and_from_a_file(cli_stack: CliStack, tmp_path: Path) -> None:
    assert len(LONG.encode()) > 131072
    run, stack = cli_stack.run, cli_stack.stack
    r = await run("chat", "new", "-", "--user", "alice", "--wait", stdin=LONG.encode())
    assert r.code == 0, r.err
    chat_id = r.out.split()[1].rstrip(":")
    messages = await stack.messages(chat_id)
    assert _message_text(messages[0]) == LONG

    second = "From a file.\n" + LONG[::-1]
    path = tmp_path / "message.txt"
    path.write_text(second, encoding="utf-8")
    r = await run("chat", "send", chat_id, "--file", str(path), "--user", "alice", "--wait")
    assert r.code == 0, r.err
    users = [m for m in await stack.messages(chat_id) if m.role == chat_pb2.MESSAGE_ROLE_USER]
    assert [_message_text(m) for m in users] == [LONG, second]

    r = await run("chat", "send", chat_id, "-", "--user", "alice", "-o", "json", stdin=b"short one")
    assert r.code == 0 and "chat" in r.json(), r.err
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    users = [m for m in await stack.messages(chat_id) if m.role == chat_pb2.MESSAGE_ROLE_USER]
    assert _message_text(users[-1]) == "short one"

    # Exactly one source, and not an empty one.
    r = await run("chat", "send", chat_id, "text", "--file", str(path), "--user", "alice")
    assert r.code == 1 and "exactly one" in r.err
    r = await run("chat", "new", "--user", "alice")
    assert r.code == 1 and "exactly one" in r.err
    r = await run("chat", "new", "-", "--user", "alice", stdin=b"  \n")
    assert r.code == 1 and "empty" in r.err


async def test_watch_until_idle_on_an_idle_chat_prints_its_state_and_exits(cli_stack: CliStack) -> None:
    stack = cli_stack.stack
    created = await stack.stub("alice").CreateChat(
        chat_service_pb2.CreateChatRequest(request_id=str(uuid.uuid4()), content=text("hi"), title="greeting")
    )
    chat_id = created.chat.id
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
    chat = await stack.chat_of(chat_id)
    r = await cli_stack.run("chat", "watch", chat_id, "--until-idle", "--user", "alice", within=30)
    assert r.code == 0, r.err
    assert r.out.strip() == (
        f"chat {chat_id} (greeting) is waiting for a message: no turn is running "
        f"(last event seq {chat.last_seq}); nothing to wait for"
    )
    assert r.err == ""
    r = await cli_stack.run("chat", "watch", chat_id, "--until-idle", "--user", "alice", "-o", "json")
    assert r.code == 0 and r.json()["status"] == "CHAT_STATUS_WAITING" and r.json()["id"] == chat_id

    # A chat whose last turn failed: its error, and exit 1 as when a followed turn fails.
    stack.sim.set_script(
        Script.from_data(
            {"conversations": [{"turns": [{"text": "x", "fault": {"kind": "invalid_key", "times": 100}}]}]}
        )
    )
    failed = await stack.stub("alice").CreateChat(
        chat_service_pb2.CreateChatRequest(request_id=str(uuid.uuid4()), content=text("fail"))
    )
    await stack.wait_status(failed.chat.id, chat_pb2.CHAT_STATUS_ERROR)
    r = await cli_stack.run("chat", "watch", failed.chat.id, "--until-idle", "--user", "alice")
    assert r.code == 1
    assert f"chat {failed.chat.id}" in r.out and "in error" in r.out and "PROVIDER_AUTH_FAILED" in r.out


async def test_watch_until_idle_follows_a_running_turn_to_its_end(cli_stack: CliStack) -> None:
    stack = cli_stack.stack
    # The reply holds at the gate until the watch has printed the turn's start: the watch
    # follows a running turn, however long the CLI takes to start.
    stack.sim.set_script(Script.from_data([{"turns": [{"text": "the reply", "gate": "reply"}]}]))
    created = await stack.stub("alice").CreateChat(
        chat_service_pb2.CreateChatRequest(request_id=str(uuid.uuid4()), content=text("go"))
    )
    await stack.sim.wait_held("reply")
    proc = await asyncio.create_subprocess_exec(
        *CLI, "chat", "watch", created.chat.id, "--until-idle", "--user", "alice", "-o", "json",
        env=cli_stack.env, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        printed: list[dict[str, Any]] = []
        while not printed or printed[-1].get("status_changed", {}).get("status") != "CHAT_STATUS_RUNNING":
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, f"the watch ended before the turn's start: {printed}"
            printed.append(json.loads(line))
        await stack.sim.open_gate("reply")
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    events = printed + [json.loads(line) for line in out.decode().splitlines()]
    assert events[-1]["status_changed"]["status"] == "CHAT_STATUS_WAITING"
    streamed = "".join(e["part_delta"]["text"] for e in events if "part_delta" in e)
    assert streamed == "the reply"


async def test_watch_gives_up_on_an_unreachable_server_and_says_why(keys_dir: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = cli_env(keys_dir, chat=address)
    for extra in (["--until-idle"], []):
        r = await run_cli(env, "chat", "watch", "some-chat", *extra, "--retries", "2", "--user", "alice")
        assert r.code == 1 and r.out == ""
        lines = r.err.strip().splitlines()
        assert len(lines) == 3, r.err
        for attempt, line in enumerate(lines[:2], 1):
            assert f"chat service at {address} unreachable" in line and "UNAVAILABLE" in line
            assert f"retrying in {0.2 * 2 ** (attempt - 1):.1f} s, attempt {attempt} of 2" in line
        assert lines[2].startswith("error: UNAVAILABLE: giving up: the chat service at")
        assert "failed 3 times in a row" in lines[2]
    r = await run_cli(
        env, "chat", "watch", "x", "--until-idle", "--retries", "1", "--user", "a", "-o", "json"
    )
    assert r.code == 1 and r.out == ""
    notice, final = (json.loads(line) for line in r.err.strip().splitlines())
    assert "retrying" in notice["notice"]["message"]
    assert final["error"]["code"] == "UNAVAILABLE" and "giving up" in final["error"]["message"]


async def test_watch_gives_up_when_the_server_goes_away_mid_stream(cli_stack: CliStack) -> None:
    stack = cli_stack.stack
    created = await stack.stub("alice").CreateChat(
        chat_service_pb2.CreateChatRequest(request_id=str(uuid.uuid4()), content=text("hi"))
    )
    await stack.wait_status(created.chat.id, chat_pb2.CHAT_STATUS_WAITING)
    proc = await asyncio.create_subprocess_exec(
        *CLI, "chat", "watch", created.chat.id, "--retries", "2", "--user", "alice",
        env=cli_stack.env, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        # The history ends with the turn's last status: once it is printed the watch is live.
        while (line := await asyncio.wait_for(proc.stdout.readline(), 30)) != b"[waiting]\n":
            assert line, "the watch ended before printing the history"
        await stack.chat.stop()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1 and out == b""
    lines = err.decode().strip().splitlines()
    assert "retrying" in lines[-2] and "attempt 2 of 2" in lines[-2], err
    assert lines[-1].startswith("error: UNAVAILABLE: giving up"), err


async def test_a_discarded_reply_is_marked_and_its_retry_printed(cli_stack: CliStack) -> None:
    stack = cli_stack.stack
    # The provider's connection drops after three words (once); the chat service discards the
    # partial reply and generates it again.
    stack.sim.set_script(
        Script.from_data(
            [{"turns": [{"text": "one two three four five", "fault": {"kind": "drop", "after_chunks": 3}}]}]
        )
    )
    r = await cli_stack.run("chat", "new", "go", "--user", "alice", "--wait")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    note = "[reply discarded (STREAM_INTERRUPTED): the text above is not kept; retrying]"
    assert note in lines, r.out
    at = lines.index(note)
    # The partial text (what reached the chat service before the drop), then the note under it.
    partial = lines[at - 1]
    assert partial and "one two three four five".startswith(partial) and partial != "one two three four five"
    assert lines[-2:] == ["one two three four five", "[waiting]"], r.out
