"""Fixtures of the fault suite: a seeded random source per test whose seed a failure prints.

Every random choice of a fault test (which replica dies, when, what each chat asks) comes from
`fault_rng`. The seed is `AGENTPLANE_FAULT_SEED` when set, else a fresh one; a failing test's
report gets a section saying how to run it again with the same seed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Generator
from typing import Any

import pytest

SEED_VARIABLE = "AGENTPLANE_FAULT_SEED"
_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def fault_seed(request: pytest.FixtureRequest) -> int:
    raw = os.environ.get(SEED_VARIABLE, "").strip()
    seed = int(raw) if raw else random.SystemRandom().randrange(2**32)
    request.node.stash[_SEED_KEY] = seed
    return seed


@pytest.fixture
def fault_rng(fault_seed: int) -> random.Random:
    """The test's only source of randomness."""
    return random.Random(fault_seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, Any]:
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if seed is not None and report.failed:
        report.sections.append(
            ("fault seed", f"seed {seed}: rerun with {SEED_VARIABLE}={seed} pytest '{item.nodeid}'")
        )
    return report
