"""Provider faults (the simulator's): 429s, 529s (Anthropic) and 503s, 500s, connections dropped and
streams broken by a malformed chunk, before or in the middle of a reply or of its tool calls.

Each chat has a conversation of its own with a random model (OpenAI-compatible or Anthropic) and
random faults on its generations. A fault that its retries outlast (inference retries a failure
before any output up to four attempts; the chat generates a reply whose stream broke mid-way
again, twice) must leave no trace but retry notices and discarded partial replies: the chat ends
WAITING with every reply once and every tool call run once, never a call from a broken stream.
A fault that outlasts them ends the chat in ERROR with the reason that says why.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from services.common.settings import Settings
from services.simulator.script import Script
from tests.faults.invariants import check_chats
from tests.faults.stack import FAST_CHAT, start_fault_stack
from tests.faults.workload import ChatPlan, Scenario, plan_turns, script_data

RECOVERING_CHATS = 8
FAILING_CHATS = 4


def recoverable(rng: random.Random) -> dict[str, Any] | None:
    """A fault the retries outlast, or none."""
    kind = rng.choice(["rate_limit", "overloaded", "server_error", "drop", "malformed", "reset", None])
    if kind is None:
        return None
    if kind in ("rate_limit", "overloaded", "server_error"):
        # Before any output: inference makes four attempts.
        return {"kind": kind, "times": rng.randint(1, 3), "retry_after": 0.01}
    if kind == "reset":
        # The connection drops before any output: inference retries it too.
        return {"kind": "drop", "after_chunks": 0, "times": rng.randint(1, 3)}
    # Mid-stream: the chat discards the partial reply and generates it again, twice at most.
    return {"kind": kind, "after_chunks": rng.randint(1, 5), "times": rng.randint(1, 2)}


def fatal(rng: random.Random) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A fault that outlasts every retry, and the ERROR reasons it may end the chat with."""
    kind = rng.choice(["rate_limit", "overloaded", "drop", "malformed"])
    if kind == "rate_limit":
        return {"kind": kind, "times": 10, "retry_after": 0.01}, ("RATE_LIMITED",)
    if kind == "overloaded":
        return {"kind": kind, "times": 10}, ("PROVIDER_UNAVAILABLE",)
    # Broken mid-stream: STREAM_INTERRUPTED once inference passed output on (the chat retried
    # twice); a break before that (tool-call arguments are passed on whole, text is coalesced
    # for 20 ms) is retried by inference like any failure before output, until it gives up.
    reasons = ("STREAM_INTERRUPTED", "PROVIDER_UNAVAILABLE")
    return {"kind": kind, "after_chunks": rng.randint(1, 5), "times": 10}, reasons


@pytest.mark.timeout(90)
async def test_provider_faults_are_retried_or_end_in_a_clear_error(
    settings: Settings,
    make_token: Callable[..., str],
    workspaces_dir: str,
    fault_rng: random.Random,
    fault_seed: int,
) -> None:
    rng = fault_rng
    stack = await start_fault_stack(settings, make_token, workspaces_dir, chat_settings=FAST_CHAT)
    scenario = Scenario(stack, rng)
    try:
        workspace = await stack.workspace()
        plans: list[ChatPlan] = []
        failing: dict[str, tuple[str, ...]] = {}
        for i in range(RECOVERING_CHATS + FAILING_CHATS):
            marker = f"c{i:02d}"
            model = stack.models[rng.choice(["openai", "anthropic"])]
            if i < RECOVERING_CHATS:
                turns = plan_turns(rng, marker, 2)
                for turn in turns:
                    turn.call_fault, turn.reply_fault = recoverable(rng), recoverable(rng)
            else:
                [turn] = plan_turns(rng, marker, 1)
                fault, failing[marker] = fatal(rng)
                if rng.random() < 0.5:
                    turn.call_fault = fault
                else:
                    turn.reply_fault = fault
                turns = [turn]
            plans.append(ChatPlan(marker=marker, workspace_id=workspace, turns=turns, model=model))
        stack.sim.set_script(Script.from_data(script_data(plans)))
        await scenario.start(plans)
        await scenario.fed()

        faults = {p.marker: [(t.call_fault, t.reply_fault) for t in p.turns] for p in plans}
        expectations = []
        for chat, exp in zip(scenario.chats, scenario.expectations(), strict=True):
            reasons = failing.get(chat.plan.marker)
            exp.allowed_errors = reasons or ()
            exp.must_fail = reasons is not None
            expectations.append(exp)
        print(scenario.stats())
        await check_chats(
            stack,
            expectations,
            scenario.followers,
            context=f"seed {fault_seed}; {scenario.stats()}; faults: {faults}",
        )
    finally:
        await scenario.close()
        await stack.close()
