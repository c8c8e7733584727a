"""Fixtures for the simulator tests: a fresh simulator per test and SDK clients pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from services.simulator.server import SimulatorHandle, start_simulator


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorHandle]:
    """A simulator on a free loopback port, stopped after the test."""
    handle = await start_simulator()
    try:
        yield handle
    finally:
        await handle.stop()


@pytest.fixture
def oai(sim: SimulatorHandle) -> Any:
    """The official OpenAI SDK, retries off, against the simulator (Any: its overloads reject dicts)."""
    return openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="sk-test", max_retries=0)


@pytest.fixture
def ant(sim: SimulatorHandle) -> Any:
    """The official Anthropic SDK, retries off, against the simulator."""
    return anthropic.AsyncAnthropic(base_url=sim.anthropic_base_url, api_key="sk-ant-test", max_retries=0)
