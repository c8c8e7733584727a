"""Usage normalization and cost in micro-dollars from a model's pricing."""

from __future__ import annotations

from agentplane.config.v1 import config_pb2

from services.inference.events import UsageReport

MILLION = 1_000_000


def cost_micros(usage: UsageReport, model: config_pb2.ModelConfig) -> int | None:
    """Cost in micro-dollars, rounded up; None when the model has no pricing."""
    if not model.HasField("pricing"):
        return None
    p = model.pricing
    # Prices are micro-dollars per million tokens: sum exactly in integers, divide once, round up.
    numerator = (
        usage.input_tokens * p.input_micros_per_million
        + usage.output_tokens * p.output_micros_per_million
        + usage.cache_read_tokens * p.cache_read_micros_per_million
        + usage.cache_write_tokens * p.cache_write_micros_per_million
    )
    return -(-numerator // MILLION)
