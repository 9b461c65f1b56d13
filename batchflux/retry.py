"""What is retried, how long to wait, and when to poll a job again. Pure and synchronous.

Three pieces, all plain functions over values so they are tested without sleeping:

- :func:`parse_retry_after` reads a ``Retry-After`` header (seconds or an HTTP date).
- :class:`RetryPolicy` decides whether a failed :class:`~batchflux.errors.ApiError` is worth
  another attempt and how long to wait first (exponential backoff with full jitter, never
  shorter than the server's ``Retry-After``).
- :class:`PollPolicy` + :func:`next_poll_delay` schedule job polls from the job's progress and a
  running estimate of job duration (:class:`DurationEstimator`), so a batch spends fewer
  requests on polling than the official SDK's fixed schedule while noticing completion as fast.

The runner owns the loop; nothing here sleeps or does I/O.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import random
import time
from collections import deque
from dataclasses import dataclass

from .errors import ApiError

__all__ = [
    "TERMINAL_STATUSES",
    "DurationEstimator",
    "PollPolicy",
    "RetryPolicy",
    "next_poll_delay",
    "parse_retry_after",
]

#: Job statuses after which polling stops.
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})

#: HTTP statuses that no retry can fix, whatever the error object says.
_NEVER_RETRIED_STATUSES = frozenset({400, 401, 402, 403})

# 2**62 * any sane base_delay is far above any max_delay; it keeps the float finite.
_MAX_EXPONENT = 62


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value, or None.

    Accepts delay-seconds (``"3"``, also ``"1.5"``, which some servers send) and HTTP dates
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``). ``now`` is the current Unix time for dates (default
    ``time.time()``). The result is clamped at 0 (a date in the past means "now"). Missing,
    empty, negative-infinite, NaN or unparsable values give None.

    >>> parse_retry_after("2")
    2.0
    >>> parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", now=30.0)
    30.0
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isnan(seconds) or math.isinf(seconds):
            return None
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None instead of raising
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=datetime.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry settings for one request (submit, poll, download) and the decisions they imply.

    ``max_attempts`` counts every attempt including the first; ``max_total`` caps the seconds
    spent on one request across attempts (waits included). Attempt numbers passed to the
    methods are the number of attempts already made (1 after the first failure).

    >>> policy = RetryPolicy()
    >>> policy.should_retry(error, attempt=1, elapsed=0.3)   # doctest: +SKIP
    True
    >>> await sleep(policy.delay_for(error, 1, rng))          # doctest: +SKIP
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_total: float = 600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_total < 0:
            raise ValueError("delays must not be negative")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter backoff: ``uniform(0, min(max_delay, base_delay * 2**attempt))``.

        Full jitter (rather than equal or decorrelated jitter) spreads many workers that failed
        together across the whole window, which is what un-synchronises a thundering herd.
        """
        exponent = min(max(attempt, 0), _MAX_EXPONENT)
        ceiling = min(self.max_delay, self.base_delay * (2.0**exponent))
        return rng.uniform(0.0, ceiling)

    def should_retry(self, error: ApiError, attempt: int, elapsed: float) -> bool:
        """True if ``error`` may be retried after ``attempt`` attempts and ``elapsed`` seconds.

        Never for errors marked non-retryable, nor for 400/401/402/403 (a bad request, key or
        balance does not improve by asking again), nor once the attempt or time budget is spent.
        """
        if not error.retryable or error.http_status in _NEVER_RETRIED_STATUSES:
            return False
        if attempt >= self.max_attempts:
            return False
        return elapsed < self.max_total

    def delay_for(self, error: ApiError, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before the next attempt.

        With a server ``Retry-After`` the wait is at least that, plus a little jitter (at most
        10 % of it, capped at ``base_delay``) so that workers told the same instant do not all
        come back in the same millisecond. Without one, :meth:`backoff`.
        """
        if error.retry_after is not None:
            spread = min(self.base_delay, 0.1 * error.retry_after)
            return error.retry_after + rng.uniform(0.0, spread)
        return self.backoff(attempt, rng)


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """How :func:`next_poll_delay` schedules polls of one job.

    - ``initial``: first wait when no duration estimate exists yet (the SDK's 2 s).
    - ``first_fraction``: with an estimate ``expected``, the first poll comes at
      ``first_fraction * expected``: early enough that short jobs are not noticed late, late
      enough that the job is usually PROCESSING with a progress figure to extrapolate from.
    - ``min_interval`` / ``max_interval``: clamp of every wait.
    - ``growth``: geometric factor when there is nothing better to go on.
    - ``margin``: seconds added after a predicted completion, so the poll lands just after it.
    - ``exact_margin``: the same, when job durations are predictable (all recent jobs took
      about the same time): the first poll then comes at ``expected + exact_margin``.
    """

    initial: float = 2.0
    min_interval: float = 0.25
    max_interval: float = 10.0
    growth: float = 1.5
    margin: float = 0.25
    first_fraction: float = 0.5
    exact_margin: float = 0.02

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        if self.growth < 1.0:
            raise ValueError("growth must be >= 1")
        if self.initial < 0 or self.margin < 0 or not 0 < self.first_fraction <= 1:
            raise ValueError("initial and margin must be >= 0, first_fraction in (0, 1]")

    def clamp(self, delay: float) -> float:
        return min(self.max_interval, max(self.min_interval, delay))


DEFAULT_POLL_POLICY = PollPolicy()

# A wait at or below this that did not see completion means the progress-based prediction was
# early (progress is rounded, or not linear near the end): grow from it instead of re-polling
# at min_interval forever.
_SHORT_WAIT = 1.0


def next_poll_delay(
    policy: PollPolicy,
    *,
    elapsed: float,
    progress: int | None,
    status: str,
    previous_delay: float | None,
    expected: float | None,
    previous_progress: int | None = None,
    predictable: bool = False,
) -> float:
    """Seconds to wait before polling a job again, given what the last answer said.

    ``elapsed`` is seconds since submit; ``status``/``progress`` come from the last answer (the
    submit's ``QUEUED`` for the first call, with ``previous_delay=None``); ``expected`` is the
    estimated job duration (:attr:`DurationEstimator.expected`), or None early in a run.
    ``previous_progress`` (optional) is the progress of the answer before the last one; pass
    it so that a job stuck at one percentage is polled on a geometric schedule.
    ``predictable`` (see :attr:`DurationEstimator.is_predictable`) makes the first poll come
    right after ``expected`` rather than part-way through it.

    Reasoning, in order:

    1. Terminal status: 0 (nothing to wait for; the caller stops polling).
    2. First poll (``previous_delay is None``): at ``first_fraction * expected`` after submit
       (or ``initial`` without an estimate). Polling at once, as the SDK does, only ever
       reports QUEUED for a multi-second job.
    3. PROCESSING with ``0 < progress < 100``: progress has been rising since about submit, so
       the remaining time is about ``elapsed * (100 - p) / p``; poll right after that
       (+ ``margin``). Queue time makes this estimate long, never short, so it errs towards
       one late poll rather than several early ones. If progress did not move since the
       previous answer, or a short previous wait still did not see completion, the prediction
       is unreliable (stalled, or not linear near the end): grow geometrically instead.
    4. Otherwise (QUEUED, no progress, progress 100 but not yet COMPLETED): back off
       geometrically from the previous wait, but poll at ``expected`` if that comes sooner.

    Every wait is clamped to ``[min_interval, max_interval]``, except a first poll when jobs
    are expected to take less than ``min_interval``: it comes at the expected time (0 for
    instant jobs). For uniformly 5-15 s jobs this
    takes about 2 polls per job against the SDK's ~4.6, and notices completion sooner
    (tests/test_retry.py simulates both).
    """
    if status in TERMINAL_STATUSES:
        return 0.0
    if previous_delay is None:
        if expected is not None and predictable:
            # Every recent job took about this long: one poll, just after it should be done.
            return max(0.0, expected - elapsed) + policy.exact_margin
        if expected is not None and expected < policy.min_interval:
            # Jobs that finish faster than the shortest wait: look when this one should be done.
            return max(0.0, expected - elapsed)
        if expected is not None and expected > 0:
            return policy.clamp(policy.first_fraction * expected - elapsed)
        return policy.clamp(policy.initial - elapsed)
    if status == "PROCESSING" and progress is not None and 0 < progress < 100 and elapsed > 0:
        remaining = elapsed * (100 - progress) / progress
        delay = remaining + policy.margin
        if progress == previous_progress or previous_delay <= _SHORT_WAIT:
            delay = max(delay, previous_delay * policy.growth)
        return policy.clamp(delay)
    delay = previous_delay * policy.growth
    if expected is not None and elapsed + policy.min_interval < expected < elapsed + delay:
        delay = expected - elapsed + policy.margin
    return policy.clamp(delay)


class DurationEstimator:
    """A running estimate of job duration (submit to COMPLETED), in bounded memory.

    Keeps the last ``window`` observations and reports their median: robust to the odd job
    that waited in a long queue, and quick to follow a change of speed (e.g. ``go_fast``).

    >>> est = DurationEstimator()
    >>> est.expected is None
    True
    >>> for s in (9.0, 11.0, 10.0): est.observe(s)
    >>> est.expected
    10.0
    """

    __slots__ = ("_samples",)

    def __init__(self, *, window: int = 63) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._samples: deque[float] = deque(maxlen=window)

    def observe(self, seconds: float) -> None:
        """Record one finished job's duration (ignored if negative or not finite)."""
        if seconds >= 0 and math.isfinite(seconds):
            self._samples.append(float(seconds))

    @property
    def count(self) -> int:
        return len(self._samples)

    @property
    def is_predictable(self) -> bool:
        """True when at least 8 recent jobs all took about the same time (the middle 80 %
        within 5 % of the median, or within 50 ms for very short jobs)."""
        n = len(self._samples)
        if n < 8:
            return False
        ordered = sorted(self._samples)
        low, high = ordered[n // 10], ordered[n - 1 - n // 10]
        return high - low <= max(0.05, 0.05 * ordered[n // 2])

    @property
    def expected(self) -> float | None:
        """Median of the recent observations, or None before the first one."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        mid = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[mid]
        return (ordered[mid - 1] + ordered[mid]) / 2
