"""toolexec (a real `agentplane serve toolexec` process) and the workspace agents SIGKILLed while
chats' `execute` calls run.

Four chats in two workspaces each run an `execute` that appends its token to effects.log and then
waits for a gate file the test creates. In one turn toolexec is killed while every command waits
(it stays away for a random moment, then starts again on the same port; the agents outlive it and
reconnect, the chat re-sends its calls under the same ids, the ledger sends them to the agents
again, which answer with the run in progress): every call must get its real result once the gate
opens, its command having run once. In another turn every workspace agent is killed (with the
commands it runs): the calls must end with an error result saying the outcome is unknown, the
command having run at most once, and the next turn must run in a new agent. The order of the two
faults is random. Every chat must keep every invariant.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.common.settings import Settings
from services.simulator.script import Script
from services.toolexec.local_driver import kill_agents
from tests.faults.invariants import check_chats, read_lines, tool_results
from tests.faults.processes import ServiceProcess, service_process
from tests.faults.stack import FAST_CHAT, start_fault_stack
from tests.faults.workload import EFFECTS_FILE, ChatPlan, Scenario, TurnPlan, reply_text, script_data
from tests.helpers import wait_until

CHATS = 4
WORKSPACES = 2


def _touch(path: str) -> None:
    Path(path).touch()


@pytest.mark.timeout(120)
async def test_toolexec_and_agents_killed_during_execute(
    settings: Settings,
    make_token: Callable[..., str],
    workspaces_dir: str,
    tmp_path: Path,
    fault_rng: random.Random,
    fault_seed: int,
) -> None:
    rng = fault_rng
    toolexec: ServiceProcess | None = None

    async def start_toolexec(wired: Settings) -> str:
        nonlocal toolexec
        env = {
            "AGENTPLANE_WORKSPACES_DIR": workspaces_dir,
            # A call whose agent died waits this long for it to reconnect before toolexec starts
            # a new one (which answers "outcome unknown"); 15 s by default.
            "AGENTPLANE_AGENT_RECONNECT_GRACE_SECONDS": "2",
        }
        toolexec = service_process(wired, "toolexec", "toolexec", tmp_path, extra_env=env)
        await toolexec.start()
        return toolexec.address

    stack = await start_fault_stack(
        settings, make_token, workspaces_dir, chat_settings=FAST_CHAT, toolexec=start_toolexec
    )
    assert toolexec is not None
    scenario = Scenario(stack, rng)
    order = rng.sample(["toolexec", "agents"], 2)
    try:
        workspaces = await asyncio.gather(*(stack.workspace() for _ in range(WORKSPACES)))
        plans = []
        for i in range(CHATS):
            marker = f"c{i:02d}"
            turns = [
                TurnPlan(calls=[f"{marker}-{k}-0"], reply=reply_text(marker, k, 10), tool_gate=f"gate-{k}")
                for k in range(2)
            ]
            # A last turn proves the workspace works after both faults.
            turns.append(TurnPlan(calls=[f"{marker}-2-0"], reply=reply_text(marker, 2, 10)))
            plans.append(ChatPlan(marker=marker, workspace_id=workspaces[i % WORKSPACES], turns=turns))
        stack.sim.set_script(Script.from_data(script_data(plans)))
        await scenario.start(plans, feed_them=False)
        effects = {ws: os.path.join(stack.workspace_path(ws), EFFECTS_FILE) for ws in workspaces}

        for k, fault in enumerate(order):
            if k:
                for chat in scenario.chats:
                    await scenario.client.send(chat)
            tokens = {f"{p.marker}-{k}-0" for p in plans}
            await wait_until(
                lambda: {line for ws in workspaces for line in read_lines(effects[ws])},
                until=lambda seen: tokens <= seen,  # noqa: B023 (awaited within the iteration)
                what=f"every chat's command of turn {k} to be running",
                timeout=30,
            )
            if fault == "toolexec":
                await toolexec.kill()
                # Away for a random moment: the chats' calls fail and are re-sent meanwhile.
                await asyncio.sleep(rng.uniform(0, 1.0))
                await toolexec.start()
                for ws in workspaces:
                    _touch(os.path.join(stack.workspace_path(ws), f"gate-{k}"))
            else:
                assert kill_agents(workspaces_dir) > 0, "no workspace agent to kill"
            await scenario.wait_idle()

        for chat in scenario.chats:
            await scenario.client.send(chat)
        print(scenario.stats())
        await check_chats(
            stack,
            scenario.expectations(allowed_errors=()),
            scenario.followers,
            context=f"seed {fault_seed}; {scenario.stats()}; faults in order: {order}",
        )
        # The faults did what the test means them to: after the toolexec kill every call has its
        # real result; after the agent kill every call's outcome is unknown.
        for chat in scenario.chats:
            msgs = (
                await stack.stub().ListMessages(chat_service_pb2.ListMessagesRequest(chat_id=chat.chat_id))
            ).messages
            results = [r for m in msgs if m.role == chat_pb2.MESSAGE_ROLE_TOOL for r in tool_results(m)]
            assert len(results) == 3, [str(r) for r in results]
            for k, fault in enumerate(order):
                if fault == "toolexec":
                    assert not results[k].is_error, results[k].content
                    assert json.loads(results[k].structured_json)["exit_code"] == 0
                else:
                    assert results[k].is_error and "outcome is unknown" in results[k].content, results[k]
            assert not results[2].is_error, results[2].content
    finally:
        await scenario.close()
        await stack.close()
        await toolexec.kill()
