"""When to ask GPTunnel again: the poll schedule and the backoff after transient failures.

Pure functions of their inputs (and a random source), so they are tested without a clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

#: No Retry-After is followed further than this: a proxy asking for an hour would stall the agent.
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class PollSchedule:
    """Growing intervals between result calls: quick at first (small images finish in seconds),
    then wider so a minutes-long generation costs few calls. Jitter spreads concurrent pollers."""

    first: float = 1.0
    factor: float = 1.5
    cap: float = 5.0
    jitter: float = 0.1

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        delay = self.first
        while True:
            yield delay * (1 + rng.uniform(-self.jitter, self.jitter))
            delay = min(delay * self.factor, self.cap)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter for transient failures; Retry-After wins when given."""

    base: float = 0.5
    cap: float = 10.0

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, MAX_RETRY_AFTER)
        rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        ceiling = min(self.cap, self.base * 2 ** (attempt - 1))
        # Never zero: a burst of retries at the same instant is what a loaded upstream hates most.
        return max(0.05, rng.uniform(ceiling / 2, ceiling))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; None when absent or in the (rare) HTTP-date form."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
