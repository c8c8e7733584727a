"""Inference-specific settings, parsed once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from services.common.settings import SettingsError


@dataclass(frozen=True)
class InferenceSettings:
    """Retry, coalescing and timeout knobs of the inference service.

    Environment: AGENTPLANE_INFERENCE_COALESCE_MS (20), AGENTPLANE_INFERENCE_MAX_ATTEMPTS (4),
    AGENTPLANE_INFERENCE_RETRY_BASE_MS (500), AGENTPLANE_INFERENCE_RETRY_MAX_DELAY_MS (8000),
    AGENTPLANE_INFERENCE_RETRY_BUDGET_S (60), AGENTPLANE_INFERENCE_CONNECT_TIMEOUT_S (10),
    AGENTPLANE_INFERENCE_READ_TIMEOUT_S (300), AGENTPLANE_INFERENCE_DEFAULT_MAX_TOKENS (8192).
    """

    coalesce_ms: float = 20.0
    max_attempts: int = 4
    retry_base_ms: float = 500.0
    retry_max_delay_ms: float = 8000.0
    retry_budget_s: float = 60.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 300.0
    default_max_tokens: int = 8192

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InferenceSettings:
        """Parse from `environ` (default `os.environ`); bad values raise SettingsError naming the variable."""
        env = os.environ if environ is None else environ
        d = cls()
        return cls(
            coalesce_ms=_num(env, "COALESCE_MS", d.coalesce_ms, 0),
            max_attempts=int(_num(env, "MAX_ATTEMPTS", d.max_attempts, 1)),
            retry_base_ms=_num(env, "RETRY_BASE_MS", d.retry_base_ms, 0),
            retry_max_delay_ms=_num(env, "RETRY_MAX_DELAY_MS", d.retry_max_delay_ms, 0),
            retry_budget_s=_num(env, "RETRY_BUDGET_S", d.retry_budget_s, 0),
            connect_timeout_s=_num(env, "CONNECT_TIMEOUT_S", d.connect_timeout_s, 0.1),
            read_timeout_s=_num(env, "READ_TIMEOUT_S", d.read_timeout_s, 0.1),
            default_max_tokens=int(_num(env, "DEFAULT_MAX_TOKENS", d.default_max_tokens, 1)),
        )

    def replace(self, **changes: object) -> InferenceSettings:
        """A copy with some fields changed (tests)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def _num(env: Mapping[str, str], suffix: str, default: float, minimum: float) -> float:
    name = f"AGENTPLANE_INFERENCE_{suffix}"
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {raw!r}")
    return value
