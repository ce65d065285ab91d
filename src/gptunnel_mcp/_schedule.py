"""When to ask GPTunnel again: the poll schedule and the backoff after transient failures.

Pure functions of their inputs (and a random source), so they are tested without a clock.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

#: No Retry-After is followed further than this: a proxy asking for an hour would stall the agent.
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class PollSchedule:
    """Growing intervals between result calls, for a model with no history yet: quick at first
    (small images finish in seconds), then wider so a minutes-long generation costs few calls.
    Jitter spreads concurrent pollers."""

    first: float = 1.0
    factor: float = 1.5
    cap: float = 3.0
    jitter: float = 0.1


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


@dataclass(frozen=True)
class Timing:
    """How long a model's recent tasks took, from submission to done (seconds)."""

    low: float
    expected: float
    high: float

    #: Fewer samples than this teach nothing reliable; the fixed schedule is used instead.
    MIN_SAMPLES = 3
    #: A task found done at its first poll finished at some unknown time before: assume this
    #: much earlier, so a plan that starts too late corrects itself within a few tasks.
    UNSEEN_START = 0.8

    @classmethod
    def from_spans(cls, spans: list[tuple[float | None, float]]) -> Timing | None:
        """From (finished after, finished by) pairs: the last poll that saw each task pending,
        None if none did, and the first that saw it done."""
        if len(spans) < cls.MIN_SAMPLES:
            return None
        middles = [cls.middle(after, by) for after, by in spans]
        return cls(low=min(middles), expected=statistics.median(middles), high=max(middles))

    @classmethod
    def middle(cls, after: float | None, by: float) -> float:
        """When a task finished, from its (finished after, finished by) pair: the middle of the
        span is the estimate with the least bias; the bounds themselves would stretch a range by
        a whole poll gap at each end."""
        return ((after if after is not None else by * cls.UNSEEN_START) + by) / 2


@dataclass(frozen=True)
class PollPlan:
    """When to ask about one task, as ages (seconds since it was submitted).

    Without timing it is the growing `PollSchedule`. With a model's timing it asks rarely while
    the image cannot be ready yet, closely (`WINDOW_POLLS` times) across the range recent tasks
    finished in, and ever more rarely if the task runs late.
    """

    timing: Timing | None = None
    fallback: PollSchedule = PollSchedule()
    rng: random.Random = field(default_factory=random.Random, compare=False)

    #: Polls across the expected range: delay is about range/2/WINDOW_POLLS on the median.
    WINDOW_POLLS = 5
    MIN_GAP = 0.5

    def next_age(self, age: float) -> float:
        if self.timing is None:
            return self._fallback_next(age)
        start = max(self.fallback.first, self.timing.low * 0.97)
        end = max(start, self.timing.high * 1.03)
        gap = max(self.MIN_GAP, (end - start) / self.WINDOW_POLLS)
        if age < start:
            return start
        if age < end:
            # The next point of the grid strictly after `age` (the epsilon absorbs float error).
            return min(end, start + gap * (math.floor((age - start) / gap + 1e-9) + 1))
        # Running late: widen gradually, never beyond the fallback's cap.
        return age + min(self.fallback.cap, max(gap, 0.2 * (age - end)))

    def _fallback_next(self, age: float) -> float:
        moment, delay = 0.0, self.fallback.first
        while moment <= age:
            moment += delay * (1 + self.rng.uniform(-self.fallback.jitter, self.fallback.jitter))
            delay = min(delay * self.fallback.factor, self.fallback.cap)
        return moment
