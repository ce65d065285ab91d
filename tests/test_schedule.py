"""The poll schedule and the backoff: pure functions, checked without a clock."""

import itertools
import random

import pytest

from gptunnel_mcp._schedule import MAX_RETRY_AFTER, Backoff, PollSchedule, parse_retry_after


def test_poll_delays_start_short_grow_and_stay_capped() -> None:
    schedule = PollSchedule(first=1.0, factor=1.5, cap=5.0, jitter=0.0)
    delays = list(itertools.islice(schedule.delays(), 8))
    assert delays[:4] == pytest.approx([1.0, 1.5, 2.25, 3.375])
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert delays[-1] == pytest.approx(5.0)


def test_poll_delays_jitter_stays_within_bounds_and_varies() -> None:
    schedule = PollSchedule(first=2.0, factor=1.0, cap=2.0, jitter=0.1)
    delays = list(itertools.islice(schedule.delays(random.Random(7)), 200))
    assert all(1.8 <= d <= 2.2 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100


def test_a_30s_generation_costs_few_polls() -> None:
    # With the default schedule a 30-second image needs far fewer calls than a fixed 2 s poller (15).
    elapsed, calls = 0.0, 0
    for delay in PollSchedule(jitter=0.0).delays():
        elapsed += delay
        calls += 1
        if elapsed >= 30:
            break
    assert calls <= 9


def test_backoff_grows_exponentially_with_full_jitter_and_cap() -> None:
    backoff = Backoff(base=0.5, cap=10.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 10.0)]:
        for _ in range(50):
            assert ceiling / 2 <= backoff.delay(attempt, rng=rng) <= ceiling


def test_retry_after_wins_but_is_capped() -> None:
    backoff = Backoff()
    assert backoff.delay(1, retry_after=7.0) == 7.0
    assert backoff.delay(5, retry_after=0.0) == 0.0
    assert backoff.delay(1, retry_after=3600) == MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        (None, None),
        ("", None),
        ("-1", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected
