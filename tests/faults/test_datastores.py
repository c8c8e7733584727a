"""Postgres restarted and stopped, and Redis stopped and started again, while chats run turns.

Each test runs the whole stack on a datastore of its own (`datastores.py`; the shared servers
other tests use are never touched): six chats in two workspaces, each turn one or two `execute`
calls and a streamed reply, run by two chat replicas while a third serves the API and the live
followers. The faults come at random moments of the turns (a reply streaming, tool calls
running), with random outage lengths; afterwards every chat must keep every invariant.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from services.simulator.script import Script
from tests.faults.datastores import PrivatePostgres, PrivateRedis
from tests.faults.invariants import check_chats
from tests.faults.stack import FAST_CHAT, FaultStack, start_fault_stack
from tests.faults.workload import ChatPlan, Probe, Scenario, plan_turns, script_data
from tests.helpers import make_test_settings

CHATS = 6
WORKSPACES = 2
# Messages each chat may get: more than the faults leave time for (the tests stop sending after).
TURNS = 60


async def _start(stack: FaultStack, rng: random.Random) -> Scenario:
    """Two worker replicas, the chats, their followers and feeders."""
    for _ in range(2):
        await stack.start_chat_replica(FAST_CHAT)
    workspaces = await asyncio.gather(*(stack.workspace() for _ in range(WORKSPACES)))
    plans = [
        ChatPlan(
            marker=f"c{i:02d}",
            workspace_id=workspaces[i % WORKSPACES],
            turns=plan_turns(rng, f"c{i:02d}", TURNS, tool_seconds=0.2),
        )
        for i in range(CHATS)
    ]
    stack.sim.set_script(Script.from_data(script_data(plans)))
    scenario = Scenario(stack, rng)
    await scenario.start(plans)
    return scenario


@pytest.mark.timeout(120)
async def test_postgres_restarted_and_stopped_during_turns(
    redis_url: str,
    keys_dir: str,
    make_token: Callable[..., str],
    workspaces_dir: str,
    fault_rng: random.Random,
    fault_seed: int,
) -> None:
    rng = fault_rng
    postgres = await PrivatePostgres.start()
    settings = make_test_settings(database_url=postgres.url, redis_url=redis_url, keys_dir=keys_dir)
    stack = await start_fault_stack(settings, make_token, workspaces_dir)
    scenario: Scenario | None = None
    probe = Probe(stack.database_url)
    faults: list[str] = []
    try:
        scenario = await _start(stack, rng)
        seen = 0
        for fault in ("restart", "stop", rng.choice(("restart", "stop"))):
            # Each fault once the chats recovered from the last one, in a phase of a turn.
            seen = await scenario.wait_progress(probe, seen)
            phase = rng.choice(("streaming", "tool"))
            await scenario.wait_phase(probe, phase)
            if fault == "restart":
                await postgres.restart()
                faults.append(f"restart while {phase}")
            else:
                outage = rng.uniform(1.5, 4.0)
                await postgres.stop()
                # A client sends meanwhile: refused (UNAVAILABLE) until the database is back,
                # retried with its request id, stored once.
                sending = scenario.send_soon()
                await asyncio.sleep(outage)  # the outage itself: the database is away this long
                await postgres.start_again()
                if sending is not None:
                    await sending
                faults.append(f"stopped {outage:.1f} s while {phase}")
        await scenario.finish()
        print(scenario.stats())
        await check_chats(
            stack,
            scenario.expectations(),
            scenario.followers,
            context=f"seed {fault_seed}; {scenario.stats()}; postgres: {', '.join(faults)}",
            settle_within=45,
        )
    finally:
        if scenario is not None:
            await scenario.close()
        await probe.close()
        await stack.close()
        await postgres.close()


@pytest.mark.timeout(120)
async def test_redis_stopped_and_started_during_turns(
    database_url: str,
    keys_dir: str,
    make_token: Callable[..., str],
    workspaces_dir: str,
    fault_rng: random.Random,
    fault_seed: int,
) -> None:
    rng = fault_rng
    redis = PrivateRedis()
    settings = make_test_settings(database_url=database_url, redis_url=redis.url, keys_dir=keys_dir)
    stack = await start_fault_stack(settings, make_token, workspaces_dir)
    scenario: Scenario | None = None
    probe = Probe(stack.database_url)
    faults: list[str] = []
    try:
        scenario = await _start(stack, rng)
        seen = 0
        for _ in range(2):
            seen = await scenario.wait_progress(probe, seen)
            phase = rng.choice(("streaming", "tool"))
            await scenario.wait_phase(probe, phase)
            outage = rng.uniform(1.0, 3.0)
            await redis.stop()
            sending = scenario.send_soon()  # a client sends meanwhile
            await asyncio.sleep(outage)  # the outage itself: Redis is away this long
            await redis.start_again()
            if sending is not None:
                await sending
            faults.append(f"stopped {outage:.1f} s while {phase}")
        await scenario.finish()
        # A replay after the turn reads deltas from the Redis buffer, which lost what was
        # published while Redis was away (and the restarted server is empty): by design, its
        # deltas may be missing, never duplicated or out of place.
        print(scenario.stats())
        await check_chats(
            stack,
            scenario.expectations(allowed_errors=(), replay_may_lose_deltas=True),
            scenario.followers,
            context=f"seed {fault_seed}; {scenario.stats()}; redis: {', '.join(faults)}",
        )
    finally:
        if scenario is not None:
            await scenario.close()
        await probe.close()
        await stack.close()
        await redis.close()
