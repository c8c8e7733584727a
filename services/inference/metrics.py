"""Prometheus collectors of the inference service.

Labels: `provider` is the provider's type (openai, anthropic, openai_compatible), `model` the
model config's model name, `reason` an ErrorReason name; all bounded by the deployment's config.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.metrics import PerRegistry

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
TPS_BUCKETS = (1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 1000, 5000)

TOKEN_KINDS = ("input", "output", "reasoning", "cache_read", "cache_write")
PROVIDER_OUTCOMES = ("ok", "retried", "error", "cancelled")


class InferenceMetrics(PerRegistry):
    """Requests, provider requests, time to first token, output tokens per second, errors, retries,
    tokens and cost."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        labels = ("provider", "model")
        self.requests = Counter(
            "agentplane_inference_requests",
            "Generate calls, by outcome.",
            (*labels, "outcome"),
            registry=registry,
        )
        self.ttft = Histogram(
            "agentplane_inference_time_to_first_token_seconds",
            "Time from the start of Generate to the first output event.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "agentplane_inference_output_tokens_per_second",
            "Output tokens per second after the first token.",
            labels,
            buckets=TPS_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "agentplane_inference_errors",
            "Failed generations, by reason.",
            (*labels, "reason"),
            registry=registry,
        )
        self.retries = Counter(
            "agentplane_inference_retries",
            "Provider calls retried, by reason.",
            (*labels, "reason"),
            registry=registry,
        )
        self.provider_requests = Counter(
            "agentplane_inference_provider_requests",
            "Requests sent to providers (each attempt of a generation), by outcome: ok, retried (failed "
            "and tried again), error (failed for good), cancelled (the caller went away).",
            (*labels, "outcome"),
            registry=registry,
        )
        self.tokens = Counter(
            "agentplane_inference_tokens",
            "Tokens the providers reported, by kind (input, output, reasoning, cache_read, cache_write).",
            (*labels, "kind"),
            registry=registry,
        )
        self.cost = Counter(
            "agentplane_inference_cost_dollars",
            "Cost of the generations in US dollars, from the model configs' prices (models without "
            "prices count nothing).",
            labels,
            registry=registry,
        )
