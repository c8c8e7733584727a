"""A chat whose model hunts for the control plane's secrets from inside its workspace finds none.

The attack that broke the product once: `execute` reading toolexec's environment
(`/proc/$PPID/environ`), then minting a service token and reading every provider key. Here the
scripted model runs that and more through the real loop — every process's environment, the
agent's own, the data and workspaces directories, the control plane's ports, a grep for the keys —
and nothing of the deployment secret, the provider key or the database reaches the chat's
messages, its event stream or the tool-call ledger.
"""

from __future__ import annotations

import asyncio
import json
import shlex

import psycopg
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.simulator.script import Script
from tests.chat.conftest import Stack, text

PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(':', 1)
    try:
        socket.create_connection((host, int(port)), 2).close()
        print('REACHED', target)
    except OSError as exc:
        print('unreachable', target, type(exc).__name__)
"""


def _hunt(stack: Stack, database_port: str, data_paths: list[str]) -> list[str]:
    ports = [stack.settings.address(name) for name in ("config", "inference", "toolexec", "chat")]
    probe = f"python3 -c {shlex.quote(PROBE)} {' '.join(ports)} 127.0.0.1:{database_port}"
    return [
        "id; echo HUNT-STARTED",
        "tr '\\0' '\\n' < /proc/$PPID/environ; tr '\\0' '\\n' < /proc/1/environ; "
        "for f in /proc/[0-9]*/environ; do echo \"== $f\"; tr '\\0' '\\n' < $f; done 2>&1",
        "ps -eo pid,args; for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done",
        "ls -la / /run /run/agentplane /tmp " + " ".join(data_paths) + " 2>&1",
        probe,
        # Bracketed patterns: the command itself (in the chat's events) must not contain the needles.
        "grep -rIl -e 'sk-tes[t]' -e 'AGENTPLANE_SECRE[T]' -e 'DATABASE_UR[L]' "
        "/etc /run /tmp /workspace /root /home 2>/dev/null; env; true",
    ]


async def test_a_model_hunting_for_secrets_finds_none(stack: Stack, database_url: str, secret: str) -> None:
    database_port = str(psycopg.conninfo.conninfo_to_dict(database_url).get("port") or 5432)
    data_paths = [stack.workspaces_dir, stack.settings.data_dir]
    commands = _hunt(stack, database_port, data_paths)
    stack.sim.set_script(
        Script.from_data(
            {
                "conversations": [
                    {
                        "match": "find the keys",
                        "turns": [
                            *[
                                {
                                    "tool_calls": [
                                        {
                                            "name": "execute",
                                            "arguments": {"command": c, "timeout_seconds": 60},
                                        }
                                    ]
                                }
                                for c in commands
                            ],
                            {"text": "Nothing found."},
                        ],
                    }
                ]
            }
        )
    )
    ws = await stack.workspace()
    resp = await stack.stub().CreateChat(
        chat_service_pb2.CreateChatRequest(content=text("find the keys"), workspace_id=ws)
    )
    chat_id = resp.chat.id
    await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)

    results = [
        p.tool_result for m in await stack.messages(chat_id) for p in m.parts if p.HasField("tool_result")
    ]
    assert len(results) == len(commands)
    seen = "\n".join(r.content for r in results)
    assert "HUNT-STARTED" in seen and "uid=" in seen  # the hunt really ran
    assert "unreachable" in seen and "REACHED" not in seen, seen
    assert "PATH=/usr/local/bin" in seen  # environments were read: the workspace's own, nothing else
    for path in data_paths:
        assert f"cannot access '{path}': No such file or directory" in seen, seen

    events: list[str] = []
    call = stack.stub().StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat_id))
    try:
        async with asyncio.timeout(30):
            async for item in call:
                events.append(str(item.event))
                ev = item.event
                if ev.HasField("status_changed") and ev.status_changed.status == chat_pb2.CHAT_STATUS_WAITING:
                    break
    finally:
        call.cancel()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT content, structured_json::text FROM toolexec_tool_calls WHERE workspace_id = %s", (ws,)
        )
        ledger = json.dumps(await cur.fetchall())

    everything = "\n".join([seen, *events, ledger])
    for needle in (secret, "sk-test", database_url, "AGENTPLANE_SECRET=", "DATABASE_URL=", "REDIS_URL="):
        assert needle not in everything, f"{needle!r} reached the chat from inside the workspace"
