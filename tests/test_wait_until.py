"""`tests.helpers.wait_until`, the suite's one polling helper: what it returns and how it fails."""

from __future__ import annotations

import pytest

from tests.helpers import wait_until


async def test_returns_the_first_value_that_satisfies_the_condition() -> None:
    values = iter([0, 0, 3, 4])
    assert await wait_until(lambda: next(values), what="a non-zero value") == 3

    async def probe() -> list[int]:
        return [1, 2]

    assert await wait_until(probe, until=lambda v: len(v) == 2, what="two items") == [1, 2]


async def test_a_timeout_names_what_was_awaited_and_the_last_value_seen() -> None:
    counter = iter(range(1_000_000))

    async def status() -> str:
        return f"PENDING #{next(counter)}"

    with pytest.raises(AssertionError) as exc:
        await wait_until(status, until=lambda s: s == "WAITING", timeout=0.1, what="the chat to wait")
    message = str(exc.value)
    assert message.startswith("timed out after 0.1 s waiting for the chat to wait; last value seen: 'PENDING")
    assert int(message.rsplit("#", 1)[1].rstrip("'")) >= 1  # it looked more than once


async def test_an_exception_in_the_condition_fails_at_once() -> None:
    def broken() -> bool:
        raise RuntimeError("the probe broke")

    with pytest.raises(RuntimeError, match="the probe broke"):
        await wait_until(broken, timeout=30, what="never")
