from __future__ import annotations

import random
import statistics

import pytest

from batchflux.errors import ApiError
from batchflux.models import ErrorCategory
from batchflux.retry import (
    JobTimings,
    PollPolicy,
    RetryPolicy,
    Sighting,
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

P = PollPolicy()


def _timings(jobs: list[tuple[float, float]], *, progress_at: float = 0.5) -> JobTimings:
    """Timings taught by finished jobs of (queue, run) seconds, each seen once PROCESSING."""
    timings = JobTimings()
    for queue, run in jobs:
        seen = queue + progress_at * run
        timings.observe(queue + run, [Sighting(seen, "PROCESSING",
                                               int(progress_at * 100) // 5 * 5)])
    return timings


def test_without_any_history_polls_double_their_spacing() -> None:
    """The first jobs of a run: 1 s, then as long again as the job has taken so far."""
    nothing = JobTimings()
    assert next_poll_delay(P, nothing, [], elapsed=0.0) == 1.0
    times, sightings, t = [], [], 0.0
    while t < 20.0:
        t += next_poll_delay(P, nothing, sightings, elapsed=t)
        times.append(t)
        sightings.append(Sighting(t, "PROCESSING", 10))
    assert times[:5] == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0])
    assert next_poll_delay(P, JobTimings(), [], elapsed=0.0, expected=10.0) == 5.0


def _cold(low: float, high: float) -> tuple[float, float, float, float]:
    rng = random.Random(3)
    ours, sdk = [], []
    for _ in range(300):
        run = rng.uniform(low, high)
        ours.append(_poll_ours(JobTimings(), 0.0, run))  # nothing learned, every time
        sdk.append(_poll_sdk(0.0, run))
    return (statistics.mean(p for p, _ in ours), statistics.mean(lag for _, lag in ours),
            statistics.mean(p for p, _ in sdk), statistics.mean(lag for _, lag in sdk))


@pytest.mark.parametrize(("low", "high"), [(5.0, 15.0), (10.0, 30.0)])
def test_cold_start_on_slow_jobs_beats_the_sdk(low: float, high: float) -> None:
    """Before any job ended, a slow job costs fewer polls than on the SDK's schedule and is
    seen sooner: its progress at two early polls gives its own speed."""
    polls, lag, sdk_polls, sdk_lag = _cold(low, high)
    assert polls < sdk_polls and lag < 0.7 * sdk_lag


def test_cold_start_on_quick_jobs_sees_them_end_at_once() -> None:
    """1-3 s jobs: seen within a fifth of the SDK's lag, for at most one more poll."""
    polls, lag, sdk_polls, sdk_lag = _cold(1.0, 3.0)
    assert lag < 0.2 * sdk_lag and polls <= sdk_polls + 1


def test_first_poll_comes_when_a_typical_job_is_half_way_through_its_run() -> None:
    timings = _timings([(1.0, 10.0)] * 5 + [(1.2, 8.0)] * 4)
    delay = next_poll_delay(P, timings, [], elapsed=0.0)
    assert 1.0 + 0.5 * 8.0 <= delay <= 1.2 + 0.5 * 10.0


def test_terminal_answers_end_polling() -> None:
    done = [Sighting(3.0, "COMPLETED", 100)]
    assert next_poll_delay(P, JobTimings(), done, elapsed=3.0) == 0.0


def test_queued_jobs_are_polled_after_part_of_a_typical_run() -> None:
    timings = _timings([(1.0, 1.0)] * 9)
    delay = next_poll_delay(P, timings, [Sighting(1.5, "QUEUED", 0)], elapsed=1.5)
    assert 0.4 <= delay <= 0.6


def test_progress_is_read_against_the_queue_not_the_submit() -> None:
    """Queue 1 s, runs of 1 s: at 1.5 s and 50 % the job ends near 2.0 s. Read as if it had
    run since its submit (the old rule), it would have been polled near 3.0 s."""
    timings = _timings([(1.0, 1.0)] * 9)
    delay = next_poll_delay(P, timings, [Sighting(1.5, "PROCESSING", 50)], elapsed=1.5)
    assert 0.4 <= delay <= 0.7


def test_two_sightings_give_the_job_its_own_speed() -> None:
    """Typical runs of 10 s, but this job went from 20 % to 60 % in 2 s: it runs for 5 s."""
    timings = _timings([(0.0, 10.0)] * 9)
    sightings = [Sighting(1.0, "PROCESSING", 20), Sighting(3.0, "PROCESSING", 60)]
    delay = next_poll_delay(P, timings, sightings, elapsed=3.0)
    assert delay < 4.0  # the typical run alone would say about 4 s


def test_a_job_stuck_at_99_percent_is_not_hammered() -> None:
    timings = _timings([(0.0, 10.0)] * 9)
    sightings = [Sighting(9.9, "PROCESSING", 95)]
    t, polls = 9.9, 0
    while t < 60.0:
        delay = next_poll_delay(P, timings, sightings, elapsed=t)
        assert delay >= P.min_interval
        t += delay
        sightings.append(Sighting(t, "PROCESSING", 99))
        polls += 1
    # The SDK would poll ~10 times in these 50 s.
    assert polls <= 14


def test_predictable_jobs_are_polled_once_just_after_they_should_end() -> None:
    timings = JobTimings()
    for _ in range(8):
        timings.observe(2.0)
    assert timings.is_predictable
    assert next_poll_delay(P, timings, [], elapsed=0.1) == pytest.approx(
        2.0 - 0.1 + P.exact_margin)


# --- the schedule against the SDK's, on a virtual clock ------------------------------------


def _job_state(t: float, queue: float, run: float) -> tuple[str, int]:
    """The simulator's job: QUEUED, then linear progress in 5 % steps, then COMPLETED."""
    if t < queue:
        return "QUEUED", 0
    if t < queue + run:
        return "PROCESSING", min(99, int((t - queue) / run * 20) * 5)
    return "COMPLETED", 100


def _poll_ours(timings: JobTimings, queue: float, run: float) -> tuple[int, float]:
    sightings: list[Sighting] = []
    t = 0.0
    while True:
        delay = next_poll_delay(P, timings, sightings, elapsed=t)
        assert delay >= 0
        t += delay
        status, progress = _job_state(t, queue, run)
        sightings.append(Sighting(t, status, progress))
        if status == "COMPLETED":
            timings.observe(queue + run, sightings)
            return len(sightings), t - queue - run


def _poll_sdk(queue: float, run: float) -> tuple[int, float]:
    """The official SDK's waitFor: poll at once, then sleep 2 s, x1.5, capped at 5 s."""
    t, wait, polls = 0.0, 2.0, 0
    while True:
        polls += 1
        if _job_state(t, queue, run)[0] == "COMPLETED":
            return polls, t - queue - run
        t += wait
        wait = min(5.0, wait * 1.5)


def _compare(queue: tuple[float, float], run: tuple[float, float], n: int = 1000,
             seed: int = 20260716) -> tuple[float, float, float, float]:
    rng = random.Random(seed)
    timings = JobTimings()
    ours, sdk = [], []
    for _ in range(n):
        q, r = rng.uniform(*queue), rng.uniform(*run)
        ours.append(_poll_ours(timings, q, r))
        sdk.append(_poll_sdk(q, r))
    return (statistics.mean(p for p, _ in ours), statistics.mean(lag for _, lag in ours),
            statistics.mean(p for p, _ in sdk), statistics.mean(lag for _, lag in sdk))


@pytest.mark.parametrize("queue", [(0.0, 0.0), (0.5, 1.5)], ids=["no-queue", "queue"])
def test_long_jobs_take_under_0_7x_the_sdk_requests_and_are_seen_sooner(
        queue: tuple[float, float]) -> None:
    """Runs of 5-15 s: submit + polls + download under 0.7x the SDK's, lag well under."""
    polls, lag, sdk_polls, sdk_lag = _compare(queue, (5.0, 15.0))
    assert (polls + 2) <= 0.7 * (sdk_polls + 2)
    assert lag <= 0.5 and lag < 0.25 * sdk_lag


@pytest.mark.parametrize("queue", [(0.0, 0.0), (0.5, 1.5)], ids=["no-queue", "queue"])
def test_short_queued_jobs_are_seen_within_a_tenth_of_a_second(
        queue: tuple[float, float]) -> None:
    """Runs of 0.5-1.5 s behind a 0.5-1.5 s queue (the simulator's default timing): the end
    of a job is seen about 0.1 s after it, against 1.5 s on the SDK's schedule, for about
    as many requests. (The old schedule read progress as if the job ran since its submit:
    1.9 s of lag.)"""
    polls, lag, sdk_polls, _ = _compare(queue, (0.5, 1.5))
    assert lag <= 0.15
    assert polls <= sdk_polls + 0.5
