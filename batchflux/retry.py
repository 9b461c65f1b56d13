"""What is retried, how long to wait, and when to poll a job again. Pure and synchronous.

Three pieces, all plain functions over values so they are tested without sleeping:

- :func:`parse_retry_after` reads a ``Retry-After`` header (seconds or an HTTP date).
- :class:`RetryPolicy` decides whether a failed :class:`~batchflux.errors.ApiError` is worth
  another attempt and how long to wait first (exponential backoff with full jitter, never
  shorter than the server's ``Retry-After``).
- :class:`PollPolicy` + :func:`next_poll_delay` schedule job polls from the job's progress and
  what recent jobs taught about queue and run times (:class:`JobTimings`), so a batch spends
  fewer requests on polling than the official SDK's fixed schedule while noticing completion
  sooner, whether jobs queue before they run or not.

:func:`call_with_retries` is the one retry loop (submit, poll, upload and download use it);
it sleeps only through the ``sleep`` it is given, so it runs on a virtual clock in tests.
Nothing here does I/O.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import ApiError
from .models import ErrorCategory

T = TypeVar("T")

__all__ = [
    "TERMINAL_STATUSES",
    "JobTimings",
    "PollPolicy",
    "RetryPolicy",
    "Sighting",
    "Spread",
    "call_with_retries",
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

    >>> import random
    >>> from batchflux.errors import ApiError
    >>> error = ApiError("503", category=ErrorCategory.SERVER_ERROR, retryable=True)
    >>> policy = RetryPolicy()
    >>> policy.should_retry(error, attempt=1, elapsed=0.3)
    True
    >>> 0 < policy.delay_for(error, 1, random.Random(1)) < 5
    True
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
        balance does not improve by asking again), nor once the attempt or time budget is spent
        (a 429, which says the provider is busy, counts against the time budget only).
        """
        if not error.retryable or error.http_status in _NEVER_RETRIED_STATUSES:
            return False
        if attempt >= self.max_attempts and error.category is not ErrorCategory.RATE_LIMITED:
            # A 429 says the request is fine and the provider busy: it is retried (after its
            # Retry-After) for as long as max_total allows, however many times it comes.
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

    - ``initial``: first wait when nothing is known about job times yet (the first jobs of a
      run); each later wait is then as long as the job has taken so far, until a job ends.
    - ``min_interval`` / ``max_interval``: clamp of every wait.
    - ``growth``: geometric factor when there is nothing better to go on (a job stuck at one
      progress figure, or past every prediction).
    - ``probe``: the first poll comes at ``typical queue + probe x typical run time``, when the
      job is usually PROCESSING with a progress figure to predict its end from.
    - ``confidence``: a predicted end is polled ``confidence`` standard deviations after it
      (higher: fewer polls, more lag).
    - ``cold_confidence``: the same before any job has ended, when a job's end is predicted
      from its own progress alone. Lower: the first jobs to end teach every other job's
      schedule, so they are seen at once.
    - ``unsure``: when the predicted end is this uncertain (its spread over the time left),
      look again halfway first: a second progress figure gives the job's own speed.
    - ``exact_margin``: seconds after the expected end when job times are predictable (all
      recent jobs took about the same time): the first poll then comes just after it.
    """

    initial: float = 1.0
    min_interval: float = 0.05
    max_interval: float = 10.0
    growth: float = 1.5
    probe: float = 0.5
    confidence: float = 0.85
    cold_confidence: float = 0.7
    unsure: float = 0.25
    exact_margin: float = 0.02

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        if self.growth < 1.0:
            raise ValueError("growth must be >= 1")
        if self.initial < 0 or self.confidence < 0 or self.cold_confidence < 0 \
                or self.exact_margin < 0:
            raise ValueError("initial, confidence, cold_confidence and exact_margin must be "
                             ">= 0")
        if not 0 < self.probe <= 1 or not self.unsure > 0:
            raise ValueError("probe must be in (0, 1] and unsure > 0")

    def clamp(self, delay: float) -> float:
        return min(self.max_interval, max(self.min_interval, delay))


@dataclass(frozen=True, slots=True)
class Sighting:
    """One answer of ``GET /v2/jobs/{id}``: when (seconds since submit), status, progress."""

    elapsed: float
    status: str
    progress: int | None


#: Progress is reported in whole steps (the simulator's are 5 %): a figure p means the job
#: is somewhere in [p, p + step), so it is read as its middle.
_PROGRESS_STEP = 5.0


def _fraction(progress: int | None) -> float:
    """How far through its run a PROCESSING job is, as a fraction (middle of its step)."""
    p = 0.0 if progress is None else float(progress)
    return min(0.99, (p + _PROGRESS_STEP / 2) / 100.0)


def _own_speed(sightings: Sequence[Sighting]) -> tuple[float, float] | None:
    """A job's own run time from two PROCESSING sightings with different progress, and the
    standard deviation of that estimate (progress is rounded to whole steps)."""
    processing = [s for s in sightings if s.status == "PROCESSING" and s.progress is not None]
    if len(processing) < 2:
        return None
    earliest, last = processing[0], processing[-1]
    assert earliest.progress is not None and last.progress is not None
    if last.progress <= earliest.progress or last.elapsed <= earliest.elapsed:
        return None
    steps = last.progress - earliest.progress
    own = 100.0 * (last.elapsed - earliest.elapsed) / steps
    return own, own * (_PROGRESS_STEP / steps) / math.sqrt(3) * 1.5


def _anchor(sightings: Sequence[Sighting]) -> float:
    """Since when the job has shown its latest progress figure: the first sighting of it in a
    row (the job was at that figure then already, not just at the last sighting)."""
    last = sightings[-1]
    anchor = last.elapsed
    for sighting in reversed(sightings):
        if sighting.status != last.status or sighting.progress != last.progress:
            break
        anchor = sighting.elapsed
    return anchor


@dataclass(frozen=True, slots=True)
class Spread:
    """A learned quantity: its median and standard deviation (never below a floor)."""

    median: float
    sd: float


class JobTimings:
    """What recent jobs taught about job times, in bounded memory.

    A job waits QUEUED (queue time), then runs PROCESSING with rising progress (run time).
    Every finished job gives its whole duration (``createdAt`` to ``completedAt``, from the
    server); a job that was seen PROCESSING also splits it: its run time follows from where
    its progress stood at the first sighting, its queue time from the rest. Medians of the
    last ``window`` jobs make the estimates robust to the odd job that waited long.

    >>> timings = JobTimings()
    >>> timings.expected is None
    True
    >>> for s in (9.0, 11.0, 10.0): timings.observe(s)
    >>> timings.expected
    10.0
    """

    __slots__ = ("_durations", "_queues", "_runs")

    def __init__(self, *, window: int = 63) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._durations: deque[float] = deque(maxlen=window)
        self._queues: deque[float] = deque(maxlen=window)
        self._runs: deque[float] = deque(maxlen=window)

    def observe(self, duration: float, sightings: Sequence[Sighting] = ()) -> None:
        """Learn from one finished job: its whole ``duration`` and, when it was seen
        PROCESSING (``sightings`` since its submit), its queue and run times."""
        if not (duration >= 0 and math.isfinite(duration)):
            return
        self._durations.append(float(duration))
        for sighting in sightings:
            if sighting.status != "PROCESSING":
                continue
            remaining = duration - sighting.elapsed
            run = remaining / (1.0 - _fraction(sighting.progress))
            if remaining > 0 and run <= duration * 1.2:
                run = min(run, duration)
                self._runs.append(run)
                self._queues.append(duration - run)
            break

    @property
    def count(self) -> int:
        return len(self._durations)

    @property
    def expected(self) -> float | None:
        """Median duration of the recent jobs (queue + run), or None before the first."""
        spread = _spread(self._durations, 0.0)
        return None if spread is None else spread.median

    @property
    def duration(self) -> Spread | None:
        return _spread(self._durations, 0.01)

    @property
    def queue(self) -> Spread | None:
        return _spread(self._queues, 0.02) if len(self._queues) >= 3 else None

    @property
    def run(self) -> Spread | None:
        return _spread(self._runs, 0.02) if len(self._runs) >= 3 else None

    @property
    def is_predictable(self) -> bool:
        """True when at least 8 recent jobs all took about the same time (the middle 80 %
        within 5 % of the median, or within 50 ms for very short jobs)."""
        n = len(self._durations)
        if n < 8:
            return False
        ordered = sorted(self._durations)
        low, high = ordered[n // 10], ordered[n - 1 - n // 10]
        return high - low <= max(0.05, 0.05 * ordered[n // 2])


def _spread(values: Sequence[float], floor: float) -> Spread | None:
    if not values:
        return None
    median = statistics.median(values)
    sd = statistics.pstdev(values) if len(values) > 1 else 0.5 * median
    return Spread(median, max(sd, floor))


def next_poll_delay(policy: PollPolicy, timings: JobTimings, sightings: Sequence[Sighting], *,
                    elapsed: float, expected: float | None = None) -> float:
    """Seconds to wait before polling a job again, given what its answers said so far.

    ``sightings`` are this job's answers (oldest first; none before the first poll),
    ``elapsed`` the seconds since its submit, ``timings`` what recent jobs taught, and
    ``expected`` a guess of the duration before any job finished.

    Reasoning, in order:

    0. Nothing known (no job ended yet, no guess): poll after ``policy.initial``, then each
       time after as long as the job has taken so far (1, 2, 4, 8 s...): few polls
       for slow jobs, little lag for quick ones, until the first job that ends teaches more.
    1. First poll. Predictable jobs (all recent ones took the same time): just after that
       time. Otherwise at ``typical queue + probe x typical run``: late enough that the job
       usually runs, with a progress figure to predict from; early enough to be before its end.
    2. QUEUED: it cannot end before it runs; look again after part of a typical run, or when
       a typical queue would be over.
    3. PROCESSING at progress p: the job's own run time T is estimated by combining what was
       learned (T near the typical run time), what its progress says given a typical queue
       (T = (elapsed - queue) / p), and, from two sightings with different progress, its own
       speed. Each estimate is weighted by how sure it is. The end is predicted at
       ``(1 - p) x T`` from now; when that prediction is unsure (its spread over a quarter of
       the time left), poll halfway first to measure the speed; otherwise poll ``confidence``
       standard deviations after the predicted end.
    4. A job past its predicted end is polled every step's time while its progress moves,
       and on a geometric schedule once it sticks at one figure (the API's progress is not
       linear, or the job stalls).

    A queue ahead of the job makes *elapsed* a poor clock for its progress; today's prediction
    separates the two, which is what keeps lag low when jobs queue (tests/test_retry.py
    simulates queue and run times side by side with the official SDK's 2 s x1.5 schedule).
    """
    queue, run, duration = timings.queue, timings.run, timings.duration
    guess = duration.median if duration is not None else expected
    if guess is None:
        # Nothing known yet (the first jobs of a run): look early, then each time after as
        # long again as the job has taken so far, until its progress shows its own speed
        # or the first job that ends teaches more.
        if sightings and sightings[-1].status in TERMINAL_STATUSES:
            return 0.0
        speed = _own_speed(sightings)
        if speed is not None:
            run_time, error = speed
            last = sightings[-1]
            f = _fraction(last.progress)
            left = _anchor(sightings) + (1.0 - f) * run_time - elapsed
            if left > 0:
                return policy.clamp(left + policy.cold_confidence * (1.0 - f) * error)
        return policy.clamp(max(policy.initial, elapsed) - (elapsed if not sightings else 0.0))
    if queue is None or run is None:
        queue, run = Spread(0.0, 0.5 * guess), Spread(guess, 0.5 * guess)
    if not sightings:
        if duration is not None and timings.is_predictable:
            return max(0.0, duration.median - elapsed) + policy.exact_margin
        first = queue.median + policy.probe * run.median
        if first < policy.min_interval:
            return max(0.0, first - elapsed)  # jobs faster than the shortest wait
        return policy.clamp(first - elapsed)
    last = sightings[-1]
    if last.status in TERMINAL_STATUSES:
        return 0.0
    previous_delay = last.elapsed - (sightings[-2].elapsed if len(sightings) > 1 else 0.0)
    if last.status != "PROCESSING":  # QUEUED (or a status we do not know): not running yet
        return policy.clamp(max(policy.probe * run.median,
                                queue.median + queue.sd - elapsed))
    processing = [s for s in sightings if s.status == "PROCESSING"]
    f = _fraction(last.progress)
    # Estimates of this job's run time T, each with its variance.
    estimates = [(run.median, run.sd ** 2)]
    queued_until = max((s.elapsed for s in sightings if s.status == "QUEUED"), default=0.0)
    started = max(queue.median, queued_until)
    if last.elapsed > started:
        spent = last.elapsed - started
        estimates.append((spent / f, (queue.sd / f) ** 2 + (spent * 0.025 / f ** 2) ** 2))
    speed = _own_speed(sightings)
    if speed is not None:
        estimates.append((speed[0], speed[1] ** 2))
    weight = sum(1.0 / max(v, 1e-9) for _, v in estimates)
    run_time = sum(m / max(v, 1e-9) for m, v in estimates) / weight
    spread = math.sqrt(1.0 / weight)
    left = _anchor(sightings) + (1.0 - f) * run_time - elapsed
    uncertainty = (1.0 - f) * spread + 0.025 * run_time / 2
    if left <= 0:
        # Past the predicted end and not done: it is late. While its progress moves, look
        # again after a step's time; once it sticks at one figure (the API's progress is not
        # linear, or the job stalls), less and less often.
        step = _PROGRESS_STEP / 100.0 * run_time
        stuck = len(processing) >= 2 and processing[-1].progress == processing[-2].progress
        if stuck:
            return policy.clamp(max(step, previous_delay) * policy.growth)
        return policy.clamp(step)
    if uncertainty > policy.unsure * left and left > 4 * policy.min_interval:
        return policy.clamp(0.5 * left)
    return policy.clamp(left + policy.confidence * uncertainty)


async def call_with_retries(
    make: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float],
    rng: random.Random,
    before_attempt: Callable[[int], Awaitable[None]] | None = None,
    on_error: Callable[[ApiError, float], None] | None = None,
    on_retry: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> T:
    """``await make()`` until it succeeds or :meth:`RetryPolicy.should_retry` says stop.

    The one retry loop of batchflux: submits, polls, uploads and downloads all use it.
    ``before_attempt(n)`` is awaited before attempt ``n`` (0 for the first: throttles and
    pauses); ``on_error(error, sent_at)`` sees every failure with the clock time its request
    was sent (it may raise to stop everything, e.g. a refused key); ``on_retry()`` counts the
    retries. A failure past ``deadline`` is not retried. Only
    :class:`~batchflux.errors.ApiError` is retried; anything else propagates at once.

    In a coroutine::

        job = await call_with_retries(lambda: api.get_job(job_id), policy=RetryPolicy(),
                                      sleep=anyio.sleep, clock=time.monotonic,
                                      rng=random.Random())
    """
    first = clock()
    attempt = 0
    while True:
        if before_attempt is not None:
            await before_attempt(attempt)
        attempt += 1
        sent_at = clock()
        try:
            return await make()
        except ApiError as exc:
            if on_error is not None:
                on_error(exc, sent_at)
            now = clock()
            if deadline is not None and now >= deadline:
                raise
            if not policy.should_retry(exc, attempt, now - first):
                raise
            if on_retry is not None:
                on_retry()
            await sleep(policy.delay_for(exc, attempt, rng))
