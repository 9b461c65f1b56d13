from __future__ import annotations

import random
import statistics

import pytest

from batchflux.errors import ApiError
from batchflux.models import ErrorCategory
from batchflux.retry import (
    DurationEstimator,
    PollPolicy,
    RetryPolicy,
    next_poll_delay,
    parse_retry_after,
)

# --- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("0", 0.0),
        (" 1.5 ", 1.5),
        ("-4", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date_is_relative_to_now() -> None:
    # 1970-01-01 00:01:00 GMT is Unix time 60.
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", now=45.0) == pytest.approx(15.0)


def test_parse_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", now=1_000.0) == 0.0


# --- RetryPolicy -------------------------------------------------------------------------


def _error(category: ErrorCategory, status: int | None = None, *, retryable: bool | None = None,
           retry_after: float | None = None) -> ApiError:
    return ApiError("x", category=category, http_status=status, retryable=retryable,
                    retry_after=retry_after)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (_error(ErrorCategory.RATE_LIMITED, 429), True),
        (_error(ErrorCategory.SERVER_ERROR, 503), True),
        (_error(ErrorCategory.NETWORK), True),
        (_error(ErrorCategory.TIMEOUT), True),
        (_error(ErrorCategory.INVALID_REQUEST, 400), False),
        (_error(ErrorCategory.AUTH, 401), False),
        (_error(ErrorCategory.AUTH, 403), False),
        (_error(ErrorCategory.INSUFFICIENT_CREDITS, 402), False),
        (_error(ErrorCategory.EXPIRED, 404), False),
        # A status that can never succeed wins over a (wrong) retryable flag.
        (_error(ErrorCategory.SERVER_ERROR, 400, retryable=True), False),
        (_error(ErrorCategory.SERVER_ERROR, 500, retryable=False), False),
    ],
)
def test_should_retry_by_kind(error: ApiError, retried: bool) -> None:
    assert RetryPolicy().should_retry(error, attempt=1, elapsed=0.0) is retried


def test_should_retry_stops_at_max_attempts_and_total_time() -> None:
    policy = RetryPolicy(max_attempts=3, max_total=10.0)
    err = _error(ErrorCategory.SERVER_ERROR, 500)
    assert policy.should_retry(err, attempt=2, elapsed=1.0)
    assert not policy.should_retry(err, attempt=3, elapsed=1.0)
    assert not policy.should_retry(err, attempt=1, elapsed=10.0)


def test_backoff_is_full_jitter_within_the_exponential_cap() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0)
    rng = random.Random(1)
    for attempt, cap in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (10_000, 30.0)]:
        samples = [policy.backoff(attempt, rng) for _ in range(300)]
        assert all(0.0 <= s <= cap for s in samples)
        # Full jitter uses the whole window, not just its top.
        assert min(samples) < 0.2 * cap and max(samples) > 0.8 * cap


def test_delay_for_honours_retry_after_with_small_jitter() -> None:
    policy = RetryPolicy(base_delay=0.5)
    rng = random.Random(2)
    err = _error(ErrorCategory.RATE_LIMITED, 429, retry_after=7.0)
    delays = [policy.delay_for(err, 1, rng) for _ in range(100)]
    assert all(7.0 <= d <= 7.5 for d in delays)
    assert len(set(delays)) > 1


def test_delay_for_without_retry_after_is_backoff() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=3.0)
    err = _error(ErrorCategory.NETWORK)
    assert policy.delay_for(err, 5, random.Random(3)) == policy.backoff(5, random.Random(3))


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


# --- polling -----------------------------------------------------------------------------

P = PollPolicy()  # initial 2, min 0.25, max 10, growth 1.5, margin 0.25, first_fraction 0.5


@pytest.mark.parametrize(
    ("case", "kwargs", "expected"),
    [
        ("terminal: nothing to wait for",
         dict(elapsed=3.0, progress=100, status="COMPLETED", previous_delay=1.0, expected=10.0),
         0.0),
        ("first poll without estimate: initial",
         dict(elapsed=0.0, progress=None, status="QUEUED", previous_delay=None, expected=None),
         2.0),
        ("first poll with estimate: half the expected duration",
         dict(elapsed=0.0, progress=0, status="QUEUED", previous_delay=None, expected=10.0),
         5.0),
        ("re-attached long after the expected time: poll at once (min interval)",
         dict(elapsed=60.0, progress=None, status="QUEUED", previous_delay=None, expected=10.0),
         0.25),
        ("processing 50% after 5 s: 5 s left, poll just after",
         dict(elapsed=5.0, progress=50, status="PROCESSING", previous_delay=5.0, expected=10.0),
         5.25),
        ("processing 25% after 3 s: 9 s left",
         dict(elapsed=3.0, progress=25, status="PROCESSING", previous_delay=3.0, expected=None),
         9.25),
        ("processing 5% after 5 s: 95 s left, capped",
         dict(elapsed=5.0, progress=5, status="PROCESSING", previous_delay=5.0, expected=10.0),
         10.0),
        ("processing 99% after a long wait: almost done",
         dict(elapsed=12.0, progress=99, status="PROCESSING", previous_delay=7.0, expected=10.0),
         pytest.approx(0.25 + 12.0 / 99)),
        ("stuck at the same progress: grow instead of hammering",
         dict(elapsed=14.0, progress=99, status="PROCESSING", previous_delay=2.0, expected=10.0,
              previous_progress=99),
         3.0),
        ("99% after a short wait: grow instead of hammering",
         dict(elapsed=12.5, progress=99, status="PROCESSING", previous_delay=0.8, expected=10.0),
         pytest.approx(1.2)),
        ("still queued, no estimate: geometric",
         dict(elapsed=2.0, progress=0, status="QUEUED", previous_delay=2.0, expected=None),
         3.0),
        ("still queued, expected time comes sooner than the geometric step",
         dict(elapsed=5.0, progress=0, status="QUEUED", previous_delay=5.0, expected=8.0),
         3.25),
        ("geometric growth is capped",
         dict(elapsed=40.0, progress=None, status="QUEUED", previous_delay=9.0, expected=10.0),
         10.0),
        ("progress 100 but not yet COMPLETED: short geometric step",
         dict(elapsed=10.0, progress=100, status="PROCESSING", previous_delay=0.3, expected=None),
         pytest.approx(0.45)),
    ],
)
def test_next_poll_delay_scenarios(case: str, kwargs: dict, expected: float) -> None:
    assert next_poll_delay(P, **kwargs) == expected, case


def _job_state(t: float, duration: float) -> tuple[str, int]:
    """A job that is QUEUED for half a second, then reports linear progress."""
    if t >= duration:
        return "COMPLETED", 100
    if t < 0.5:
        return "QUEUED", 0
    return "PROCESSING", int(100 * t / duration)


def _poll_ours(duration: float, expected: float | None) -> tuple[int, float]:
    t, previous, status, progress, polls = 0.0, None, "QUEUED", 0, 0
    while True:
        delay = next_poll_delay(P, elapsed=t, progress=progress, status=status,
                                previous_delay=previous, expected=expected)
        assert delay > 0
        t += delay
        previous = delay
        polls += 1
        status, progress = _job_state(t, duration)
        if status == "COMPLETED":
            return polls, t


def _poll_sdk(duration: float) -> tuple[int, float]:
    """The official SDK's waitFor: poll at once, then sleep 2 s, x1.5, capped at 5 s."""
    t, wait, polls = 0.0, 2.0, 0
    while True:
        polls += 1
        if _job_state(t, duration)[0] == "COMPLETED":
            return polls, t
        t += wait
        wait = min(5.0, wait * 1.5)


def test_poll_schedule_beats_the_sdk_on_uniform_5_to_15_second_jobs() -> None:
    rng = random.Random(20260716)
    estimator = DurationEstimator()
    ours_polls, ours_lag, sdk_polls, sdk_lag = [], [], [], []
    for _ in range(1000):
        duration = rng.uniform(5.0, 15.0)
        polls, seen = _poll_ours(duration, estimator.expected)
        # The runner only ever learns when it *saw* completion; feed that, lag included.
        estimator.observe(seen)
        ours_polls.append(polls)
        ours_lag.append(seen - duration)
        polls, seen = _poll_sdk(duration)
        sdk_polls.append(polls)
        sdk_lag.append(seen - duration)

    assert statistics.mean(ours_polls) <= 0.7 * statistics.mean(sdk_polls)
    assert statistics.mean(ours_lag) <= statistics.mean(sdk_lag) + 0.25
    assert all(lag >= 0 for lag in ours_lag)


def test_poll_schedule_without_any_estimate_is_still_no_worse_than_the_sdk() -> None:
    rng = random.Random(5)
    durations = [rng.uniform(5.0, 15.0) for _ in range(300)]
    ours = [_poll_ours(d, None) for d in durations]
    sdk = [_poll_sdk(d) for d in durations]
    assert statistics.mean(p for p, _ in ours) <= statistics.mean(p for p, _ in sdk)
    assert (statistics.mean(t - d for (_, t), d in zip(ours, durations))
            <= statistics.mean(t - d for (_, t), d in zip(sdk, durations)) + 0.25)


def test_poll_schedule_does_not_hammer_a_job_stuck_at_99_percent() -> None:
    t, previous, previous_progress, polls = 12.0, 7.0, 41, 0
    while t < 60.0:
        delay = next_poll_delay(P, elapsed=t, progress=99, status="PROCESSING",
                                previous_delay=previous, expected=10.0,
                                previous_progress=previous_progress)
        t += delay
        previous, previous_progress = delay, 99
        polls += 1
    # The SDK would poll ~10 times in these 48 s; the first re-poll is quick, then geometric.
    assert polls <= 14


# --- DurationEstimator -------------------------------------------------------------------


def test_duration_estimator_is_a_bounded_median() -> None:
    est = DurationEstimator(window=5)
    assert est.expected is None
    for s in (1.0, 100.0, 2.0, 3.0):
        est.observe(s)
    assert est.expected == 2.5
    for s in (10.0, 10.0, 10.0, 10.0, 10.0):
        est.observe(s)
    assert est.count == 5
    assert est.expected == 10.0


def test_duration_estimator_ignores_garbage() -> None:
    est = DurationEstimator()
    est.observe(-1.0)
    est.observe(float("nan"))
    est.observe(float("inf"))
    assert est.expected is None


def test_durations_are_predictable_only_when_recent_jobs_agree() -> None:
    steady, spread = DurationEstimator(), DurationEstimator()
    for i in range(7):
        steady.observe(2.0 + 0.01 * (i % 3))
    assert not steady.is_predictable  # too few to tell
    steady.observe(2.0)
    assert steady.is_predictable
    for s in (5, 7, 9, 11, 13, 15, 6, 8, 10, 12):
        spread.observe(float(s))
    assert not spread.is_predictable


def test_predictable_jobs_are_polled_once_just_after_they_should_end() -> None:
    policy = PollPolicy()
    first = next_poll_delay(policy, elapsed=0.1, progress=None, status="QUEUED",
                            previous_delay=None, expected=2.0, predictable=True)
    assert first == pytest.approx(2.0 - 0.1 + policy.exact_margin)
    unsure = next_poll_delay(policy, elapsed=0.1, progress=None, status="QUEUED",
                             previous_delay=None, expected=2.0, predictable=False)
    assert unsure < first  # without that confidence, look earlier and follow progress
