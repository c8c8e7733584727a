"""Our one retry policy: exponential backoff with jitter, Retry-After honoured, bounded attempts and time."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of the retry loop around a provider call."""

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    budget_s: float = 60.0

    def delay(self, attempt: int, retry_after_s: float | None, elapsed_s: float) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when no retry is allowed.

        `attempt` is the attempt that just failed (1-based). Retry-After, when the provider
        sent it, replaces the backoff; a wait that would overrun the budget is refused.
        """
        if attempt >= self.max_attempts:
            return None
        if retry_after_s is not None:
            wait = retry_after_s
        else:
            # "Equal jitter": half fixed, half random, so concurrent callers spread out.
            backoff = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
            wait = backoff / 2 + random.uniform(0, backoff / 2)
        if elapsed_s + wait > self.budget_s:
            return None
        return wait
