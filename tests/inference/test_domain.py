"""Domain pieces without servers: retry policy, coalescer, cost, Retry-After, image checks."""

from __future__ import annotations

import pytest
from agentplane.config.v1 import config_pb2
from agentplane.inference.v1 import inference_pb2

from services.common.errors import InvalidArgument
from services.inference.classify import parse_retry_after
from services.inference.coalesce import REASONING, TEXT, Coalescer
from services.inference.events import UsageReport
from services.inference.retry import RetryPolicy
from services.inference.usage import cost_micros
from services.inference.validation import image_type, validate_image


def test_backoff_grows_with_jitter_and_respects_bounds() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay_s=1, max_delay_s=3, budget_s=10)
    for attempt, (low, high) in {1: (0.5, 1), 2: (1, 2), 3: (1.5, 3)}.items():
        delay = policy.delay(attempt, None, 0)
        assert delay is not None and low <= delay <= high
    assert policy.delay(4, None, 0) is None  # attempts exhausted
    assert policy.delay(1, 2.5, 0) == 2.5  # Retry-After replaces the backoff
    assert policy.delay(1, 5, 6) is None  # would overrun the budget


def test_coalescer_sends_first_at_once_then_by_interval() -> None:
    c = Coalescer(0.02)
    assert c.add(TEXT, "a", 0.0) == [(TEXT, "a")]
    assert c.add(TEXT, "b", 0.005) == []
    assert c.add(TEXT, "c", 0.010) == []
    assert c.due_in(0.010) == pytest.approx(0.01)
    assert c.add(TEXT, "d", 0.021) == [(TEXT, "bcd")]
    # Switching kind flushes what was buffered first, preserving order.
    assert c.add(TEXT, "e", 0.025) == []
    assert c.add(REASONING, "r", 0.030) == [(TEXT, "e")]
    assert c.take() == (REASONING, "r")


def test_cost_rounds_up_and_is_absent_without_pricing() -> None:
    usage = UsageReport(input_tokens=1, output_tokens=1)
    priced = config_pb2.ModelConfig(
        pricing=config_pb2.ModelPricing(input_micros_per_million=1, output_micros_per_million=1)
    )
    assert cost_micros(usage, priced) == 1  # 2e-6 micro-dollars rounds up to 1
    assert cost_micros(usage, config_pb2.ModelConfig()) is None


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({}) is None


def test_images_are_checked_by_magic_bytes() -> None:
    assert image_type(b"GIF89a....") == "image/gif"
    assert image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    with pytest.raises(InvalidArgument) as exc:
        validate_image(
            inference_pb2.ImagePart(data=b"\xff\xd8\xff" + bytes(10 * 1024 * 1024), mime_type="image/jpeg"),
            "img",
        )
    assert exc.value.field == "img.data"
