"""Two chat replicas share the work; one is a real `agentplane serve chat` process, killed mid-turn."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.common.settings import Settings
from services.simulator.script import Script
from tests.chat.conftest import FAST_CHAT, read_file, start_stack, stop_stack, text
from tests.helpers import deployment_keys_dir

CHATS = 6
SCRIPT = Script.from_data(
    {
        "conversations": [
            {
                "match": "count runs",
                "turns": [
                    {"tool_calls": [{"name": "execute", "arguments": {"command": "echo run >> runs.log"}}]},
                    # Held until the test has killed replica B in the middle of this generation.
                    {"text": "All done.", "gate": "final"},
                ],
            }
        ]
    }
)


def _replica_env(settings: Settings, worker_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": settings.require_database_url(),
            "REDIS_URL": settings.redis_url or "",
            "AGENTPLANE_KEYS_DIR": deployment_keys_dir(),
            "AGENTPLANE_HOST": "127.0.0.1",
            "AGENTPLANE_CHAT_PORT": "0",
            "AGENTPLANE_CHAT_METRICS_PORT": "0",
            "AGENTPLANE_CONFIG_ADDR": settings.address("config"),
            "AGENTPLANE_INFERENCE_ADDR": settings.address("inference"),
            "AGENTPLANE_TOOLEXEC_ADDR": settings.address("toolexec"),
            "AGENTPLANE_CHAT_WORKER_ID": worker_id,
            "AGENTPLANE_CHAT_MAX_CONCURRENT": "3",
            "AGENTPLANE_CHAT_LEASE_SECONDS": "3",
            "AGENTPLANE_CHAT_RENEW_INTERVAL_SECONDS": "0.5",
            "AGENTPLANE_CHAT_POLL_INTERVAL_SECONDS": "0.5",
            "AGENTPLANE_CHAT_SWEEP_INTERVAL_SECONDS": "0.5",
        }
    )
    return env


async def _spawn_replica(env: dict[str, str], log_path: str) -> asyncio.subprocess.Process:
    """`agentplane serve chat` as a real child process, its output in `log_path`."""
    log = _open_log(log_path)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "serve", "chat", env=env, stdout=log, stderr=log
        )
    finally:
        log.close()


def _open_log(path: str) -> Any:
    return open(path, "wb")  # handed to the child, closed right after the spawn


@pytest.mark.timeout(120)
async def test_killed_replica_chats_finish_on_the_other(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str, tmp_path: Any
) -> None:
    stack = await start_stack(
        settings,
        make_token,
        workspaces_dir,
        chat_settings=replace(FAST_CHAT, max_concurrent_chats=3),
        script=SCRIPT,
    )
    log_path = tmp_path / "replica-b.log"
    proc: asyncio.subprocess.Process | None = None
    try:
        stub = stack.stub()
        chats: dict[str, str] = {}
        for _ in range(CHATS):
            ws = await stack.workspace()
            resp = await stub.CreateChat(
                chat_service_pb2.CreateChatRequest(content=text("count runs"), workspace_id=ws)
            )
            chats[resp.chat.id] = ws
        proc = await _spawn_replica(_replica_env(stack.settings, "replica-b"), str(log_path))
        db_url = stack.settings.require_database_url()

        async def b_chats() -> list[str]:
            async with await psycopg.AsyncConnection.connect(db_url) as conn:
                cur = await conn.execute("SELECT id FROM chat_chats WHERE worker_id = 'replica-b'")
                return [str(r[0]) for r in await cur.fetchall()]

        # A runs 3 chats at most and none of them can finish: B takes the other 3. Every chat
        # runs its tool, then its final generation holds at the gate.
        await stack.sim.wait_held("final", count=CHATS, within=40)
        killed = await b_chats()
        assert len(killed) == CHATS - 3, killed
        for chat_id in killed:
            assert len(await stack.messages(chat_id)) == 3, "B's chats are mid-turn: tool run, reply not"
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        await stack.sim.open_gate("final")

        for chat_id in chats:
            await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING, within=40)
        for chat_id, ws in chats.items():
            msgs = await stack.messages(chat_id)
            roles = [m.role for m in msgs]
            assert roles == [
                chat_pb2.MESSAGE_ROLE_USER,
                chat_pb2.MESSAGE_ROLE_ASSISTANT,
                chat_pb2.MESSAGE_ROLE_TOOL,
                chat_pb2.MESSAGE_ROLE_ASSISTANT,
            ], (chat_id, chat_id in killed, roles)
            assert msgs[-1].parts[0].text.text == "All done."
            runs = read_file(os.path.join(stack.workspace_path(ws), "runs.log"))
            assert runs == "run\n", "the tool ran exactly once"
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            cur = await conn.execute("SELECT count(*) FROM chat_chats WHERE worker_id IS NOT NULL")
            row = await cur.fetchone()
            assert row is not None and row[0] == 0
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
        await stop_stack(stack)
