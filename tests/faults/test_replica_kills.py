"""Chat replicas (real `agentplane serve chat` processes) SIGKILLed at random points of busy turns.

Eight chats in three shared workspaces run turns of one or two `execute` calls (each appends a
token to the workspace's effects.log, then works for 0.3 s) followed by a streamed reply, on
three replicas; clients send their messages through any replica (retrying with the same request
id when theirs dies) and follow each chat live through a random replica, reconnecting after the
last seq they got when it dies. Meanwhile the test kills a replica at least `KILLS` times: while
it streams a reply, while it waits for tool calls, or at a random moment of whatever it does, and
starts a replacement each time. Then every chat must keep every invariant (`invariants.py`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.settings import Settings
from services.simulator.script import Script
from tests.faults.invariants import check_chats
from tests.faults.processes import ChatReplicas, ServiceProcess
from tests.faults.stack import FaultStack, start_fault_stack
from tests.faults.workload import ChatPlan, Probe, Scenario, plan_turns, script_data
from tests.helpers import wait_until

KILLS = 20
REPLICAS = 3
CHATS = 8
WORKSPACES = 3
# Messages each chat may get: more than the kills leave time for (a chat with none left has no
# turn to be killed in), fewer than the script would be slow to build.
TURNS = 80
PHASES = ("streaming", "tool", "any")


async def _victim(probe: Probe, replicas: ChatReplicas, phase: str) -> ServiceProcess | None:
    """A serving replica with a chat in `phase` now (None when there is none)."""
    ready = {r.name: r for r in replicas.ready}
    if len(ready) < 2:
        return None  # one replica must stay up to take the victim's chats over
    owners = sorted({worker for _, worker in await probe.in_phase(phase) if worker in ready})
    return ready[owners[0]] if owners else None


@pytest.mark.timeout(150)
async def test_replicas_killed_at_random_points_keep_every_chat_whole(
    settings: Settings,
    make_token: Callable[..., str],
    workspaces_dir: str,
    tmp_path: Path,
    fault_rng: random.Random,
    fault_seed: int,
) -> None:
    rng = fault_rng
    stack: FaultStack = await start_fault_stack(settings, make_token, workspaces_dir)
    replicas = ChatReplicas(stack.settings, tmp_path)

    def addresses() -> list[str]:
        return [stack.chat.address] + [r.address for r in replicas.ready]

    scenario = Scenario(stack, rng, addresses)
    probe = Probe(stack.database_url)
    spawns: list[asyncio.Task[ServiceProcess]] = []
    kills: list[str] = []
    try:
        workspaces = await asyncio.gather(*(stack.workspace() for _ in range(WORKSPACES)))
        plans = [
            ChatPlan(
                marker=f"c{i:02d}",
                workspace_id=workspaces[i % WORKSPACES],
                turns=plan_turns(rng, f"c{i:02d}", TURNS, tool_seconds=0.3),
            )
            for i in range(CHATS)
        ]
        stack.sim.set_script(Script.from_data(script_data(plans)))
        await asyncio.gather(*(replicas.spawn() for _ in range(REPLICAS)))
        await scenario.start(plans)

        while replicas.kills < KILLS:
            phase = rng.choice(PHASES)
            victim = await wait_until(
                lambda: _victim(probe, replicas, phase),  # noqa: B023 (awaited in this iteration)
                what=f"a serving replica with a chat in phase {phase!r} (kill {replicas.kills + 1})",
                timeout=45,
            )
            assert victim is not None
            # Where in the phase it dies: a random moment of it, not its first instant.
            await asyncio.sleep(rng.uniform(0, 0.25 if phase == "any" else 0.1))
            await replicas.kill(victim)
            kills.append(f"{victim.name} ({phase})")
            spawns.append(asyncio.create_task(replicas.spawn()))
        await scenario.finish()
        await asyncio.gather(*spawns)

        print(scenario.stats())
        await check_chats(
            stack,
            scenario.expectations(allowed_errors=()),
            scenario.followers,
            context=f"seed {fault_seed}; {scenario.stats()}; kills: {', '.join(kills)}",
        )
        assert scenario.reconnects > 0, "no live follower reconnected across a kill"
    finally:
        for task in spawns:
            task.cancel()
        await asyncio.gather(*spawns, return_exceptions=True)
        await scenario.close()
        await probe.close()
        await replicas.close()
        await stack.close()
