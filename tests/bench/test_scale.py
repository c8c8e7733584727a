"""`agentplane bench scale`: a tiny run through the real stack, and the search for the largest N."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from services.bench import scale


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    return parser.parse_args(list(argv))


async def test_a_small_scale_run_completes_every_turn_and_reports_what_it_measured(
    database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    args = _args(
        "--chats", "3", "--turns", "2", "--ttft-ms", "20", "--token-delay-ms", "5", "--words", "10",
        "--ramp-seconds", "0.1", "--turn-timeout", "60",
    )  # fmt: skip
    result = await asyncio.wait_for(asyncio.to_thread(scale.run, args), 180)
    assert result["failures"] == 0, result["failure_reasons"]
    assert result["completed_turns"] == 6
    assert result["chats"] == 3 and result["turns"] == 2 and result["ramp_seconds"] == 0.1
    for key in ("first_delta_p99_ms", "first_turn_first_delta_p99_ms", "later_turns_first_delta_p99_ms"):
        assert result[key] > -20  # latency minus the simulator's TTFT: never much below zero
    assert result["turn_p99_ms"] >= result["turn_p50_ms"] > 20
    assert result["meets_target"] == (result["first_delta_p99_ms"] <= 500)
    assert set(result["cpu_ms_per_turn"]) >= {"chat", "inference", "simulator", "config", "toolexec"}
    assert result["cpu_ms_per_turn"]["chat"] > 0
    for service in ("chat", "inference", "config", "toolexec", "simulator"):
        assert result[f"{service}_peak_rss_mib"] > 10


@pytest.mark.parametrize("threshold", [1, 7, 24, 25, 26, 60, 137, 333, 499, 500])
def test_largest_passing_finds_the_threshold_within_its_resolution(threshold: int) -> None:
    tried: list[int] = []

    def attempt(n: int) -> bool:
        tried.append(n)
        return n <= threshold

    found = scale.largest_passing(attempt, start=25, cap=500)
    assert found <= threshold
    assert threshold - found <= max(1, int(found * 0.1))
    assert found in tried and len(tried) <= 12


def test_largest_passing_when_nothing_or_everything_passes() -> None:
    assert scale.largest_passing(lambda n: False, start=25, cap=500) == 0
    tried: list[int] = []

    def always(n: int) -> bool:
        tried.append(n)
        return True

    assert scale.largest_passing(always, start=25, cap=500) == 500
    assert tried == [25, 50, 100, 200, 400, 500]
