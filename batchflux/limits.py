"""The three limits every worker shares: a token bucket, a global cooldown, an adaptive cap.

- :class:`TokenBucket` spaces submits (and polls) to a request rate, exactly: each caller
  reserves the next free slot and sleeps once until it, so the rate is met without polling
  and callers are served in arrival order.
- :class:`Cooldown` is the shared pause after a 429: one worker is told ``Retry-After`` and
  every worker waits.
- :class:`AdaptiveLimit` caps jobs in flight and adapts the cap: slow start (one more slot
  per clean completion, so the cap doubles per job round trip) until the provider first
  pushes back, then AIMD (halve on a rate limit, add one after a run of clean completions).

Time is injected (``clock`` and ``sleep``) so tests run on a fake clock without sleeping.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Literal, Self

import anyio

__all__ = ["AdaptiveLimit", "CapDetector", "Clock", "Cooldown", "Sleep", "SubmitRateLearner",
           "TokenBucket", "Verdict"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
#: What a submit's 429 told :class:`SubmitRateLearner` (see its ``on_rate_limited``).
Verdict = Literal["first", "measured", "same", "unmeasured"]


class TokenBucket:
    """Allow at most ``rate_per_second`` acquisitions per second, with bursts of ``burst``.

    Implemented as GCRA (virtual scheduling): the bucket keeps the theoretical time at which
    the next token is due, each :meth:`acquire` books a slot synchronously (so callers are
    served first come, first served) and then sleeps exactly until it. Sleeping late does not
    shift later slots, so the long-run rate is the configured one. A caller cancelled while
    waiting gives its slot back if nobody booked after it.

    ``rate_per_second=None`` (or ``math.inf``) means unlimited: :meth:`acquire` returns at once.

    >>> import anyio
    >>> bucket = TokenBucket(500 / 60, burst=5)   # 500 requests per minute
    >>> anyio.run(bucket.acquire)                 # a token is there: at once
    """

    __slots__ = ("_burst_span", "_clock", "_generation", "_interval", "_next_due", "_sleep",
                 "rate")

    def __init__(
        self,
        rate_per_second: float | None,
        *,
        burst: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if rate_per_second is not None and not rate_per_second > 0:
            raise ValueError("rate_per_second must be positive (or None for unlimited)")
        if not burst >= 1.0:
            raise ValueError("burst must be at least 1")
        self.rate = rate_per_second
        self._clock = clock
        self._sleep = sleep
        unlimited = rate_per_second is None or math.isinf(rate_per_second)
        self._interval = 0.0 if unlimited else 1.0 / rate_per_second  # type: ignore[operator]
        # How far ahead of "now" the schedule may run before callers must wait.
        self._burst_span = (burst - 1.0) * self._interval
        self._next_due: float | None = None
        self._generation = 0  # bumped when the rate falls: waiting callers book again

    @property
    def is_unlimited(self) -> bool:
        return self._interval == 0.0

    def set_rate(self, rate_per_second: float | None) -> None:
        """Change the rate from now on (None: unlimited).

        Slots already booked stay booked when the rate rises or barely falls. When it falls
        by more than 5 % (a provider's 429 told us its rate), the schedule starts again from
        now and callers already waiting book again at the new rate (each notices within
        ``max(0.25 s, 4 intervals)``): slots booked at the old rate would go on sending too
        fast for as long as the queue of waiters lasts.
        """
        if rate_per_second is not None and not rate_per_second > 0:
            raise ValueError("rate_per_second must be positive (or None for unlimited)")
        burst = 1.0 + (self._burst_span / self._interval if self._interval else 0.0)
        old_interval = self._interval
        self.rate = rate_per_second
        unlimited = rate_per_second is None or math.isinf(rate_per_second)
        self._interval = 0.0 if unlimited else 1.0 / rate_per_second  # type: ignore[operator]
        self._burst_span = (burst - 1.0) * self._interval
        if unlimited:
            self._next_due = None
        elif self._interval > old_interval * 1.05:
            self._generation += 1
            self._next_due = None

    def reserve(self) -> float:
        """Book the next slot and return how many seconds to wait for it (0 if available)."""
        if self._interval == 0.0:
            return 0.0
        now = self._clock()
        due = now if self._next_due is None else max(self._next_due, now)
        self._next_due = due + self._interval
        return max(0.0, due - self._burst_span - now)

    async def acquire(self) -> None:
        """Wait for a token."""
        while True:
            if self._interval == 0.0:
                return
            generation = self._generation
            wait = self.reserve()
            if wait <= 0.0:
                return
            booked = self._next_due
            due = self._clock() + wait
            try:
                while self._generation == generation:
                    left = due - self._clock()
                    if left <= 0.0:
                        return
                    await self._sleep(min(left, max(0.25, 4.0 * self._interval)))
            except BaseException:
                # Cancelled (or the sleep failed) before using the slot: hand it back, unless
                # someone booked after us (their slot time is already promised).
                if self._generation == generation and self._next_due == booked \
                        and booked is not None:
                    self._next_due = booked - self._interval
                raise
            # The rate fell while we waited: the slot was booked at the old one; book again.


class Cooldown:
    """A pause shared by every worker, e.g. after a 429 with ``Retry-After``.

    :meth:`trigger` extends the pause (never shortens it); :meth:`wait` returns at once when
    not cooling down, else sleeps until the pause ends, re-checking in case it was extended
    meanwhile. :attr:`remaining` is for the progress display.
    """

    __slots__ = ("_clock", "_ends_at", "_sleep", "triggers")

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = anyio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._ends_at = -math.inf
        #: How many times :meth:`trigger` was called (for the run report).
        self.triggers = 0

    def trigger(self, seconds: float) -> None:
        """Pause everyone for at least ``seconds`` from now."""
        self.triggers += 1
        if seconds > 0 and math.isfinite(seconds):
            self._ends_at = max(self._ends_at, self._clock() + seconds)

    @property
    def remaining(self) -> float:
        """Seconds left in the current pause (0 when not cooling down)."""
        return max(0.0, self._ends_at - self._clock())

    @property
    def is_active(self) -> bool:
        return self.remaining > 0.0

    async def wait(self) -> None:
        """Return once no pause is in effect."""
        while True:
            left = self._ends_at - self._clock()
            if left <= 0:
                return
            await self._sleep(left)


class AdaptiveLimit:
    """A cap on work in flight that adapts to rate limits: slow start, then AIMD.

    ``async with limit:`` (or :meth:`acquire` / :meth:`release`) holds one slot; waiters are
    served in arrival order. While :attr:`slow_start` (from the start until the provider first
    pushes back: :meth:`on_rate_limited` or :meth:`pin`), :meth:`on_success` adds one slot per
    clean completion, so the cap doubles every job round trip, as TCP's slow start does.
    After that, :meth:`on_rate_limited` halves the limit, at most once per episode (a 429
    answers requests that were sent under the old limit, so further 429s are ignored until as
    many slots as were in use at the decrease have been released), and :meth:`on_success`
    adds one after ``increase_after`` clean completions in a row. The limit stays within
    ``[minimum, maximum]``; lowering it below :attr:`in_use` is fine: new acquisitions wait
    until enough slots are released.

    :attr:`history` lists ``(clock time, new limit)`` for every change (bounded), for the run
    report.
    """

    def __init__(
        self,
        initial: int,
        *,
        maximum: int,
        minimum: int = 1,
        increase_after: int = 8,
        clock: Clock = time.monotonic,
        history_size: int = 256,
        slow_start: bool = False,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        if increase_after < 1:
            raise ValueError("increase_after must be at least 1")
        self._limit = min(maximum, max(minimum, initial))
        self.maximum = maximum
        self.minimum = minimum
        self.increase_after = increase_after
        self._clock = clock
        self.slow_start = slow_start
        #: The cap a provider revealed (:meth:`pin`), or None.
        self.pinned: int | None = None
        self._in_use = 0
        self._waiters: deque[anyio.Event] = deque()
        self._successes = 0
        self._releases = 0
        # Releases needed after a decrease before another decrease counts (0: none pending).
        self._episode_ends_at_release = 0
        self._history: deque[tuple[float, int]] = deque(maxlen=max(2, history_size))
        self._history.append((clock(), self._limit))

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def history(self) -> list[tuple[float, int]]:
        """``(time, new limit)`` for the initial limit and each change, oldest first."""
        return list(self._history)

    async def acquire(self) -> None:
        """Wait for a free slot (first come, first served)."""
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                # The slot was handed to us just as we were cancelled: pass it on.
                self.release()
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        """Give a slot back."""
        if self._in_use <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_use -= 1
        self._releases += 1
        self._wake()

    async def __aenter__(self) -> Self:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def on_rate_limited(self) -> bool:
        """Halve the limit unless this episode already did; True if the limit changed."""
        self._successes = 0
        self.slow_start = False
        if self._releases < self._episode_ends_at_release:
            return False
        self._episode_ends_at_release = self._releases + max(1, self._in_use)
        return self._set(max(self.minimum, self._limit // 2))

    def pin(self, limit: int) -> bool:
        """Set the limit to ``limit`` and make it the maximum (e.g. a cap the server revealed).
        True if the limit changed."""
        limit = max(self.minimum, min(self.maximum, limit))
        self.maximum = limit
        self.pinned = limit
        self.slow_start = False
        self._successes = 0
        return self._set(limit)

    def on_success(self) -> bool:
        """Count a clean completion; add one slot (in slow start: for each; after: for a run
        of ``increase_after``). True if the limit changed."""
        if self.slow_start:
            changed = self._set(min(self.maximum, self._limit + 1))
            if self._limit >= self.maximum:
                self.slow_start = False
            return changed
        self._successes += 1
        if self._successes < self.increase_after:
            return False
        self._successes = 0
        return self._set(min(self.maximum, self._limit + 1))

    def _set(self, new: int) -> bool:
        if new == self._limit:
            return False
        self._limit = new
        self._history.append((self._clock(), new))
        self._wake()
        return True

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._limit:
            self._in_use += 1
            self._waiters.popleft().set()

    def __repr__(self) -> str:
        return (f"AdaptiveLimit(limit={self._limit}, in_use={self._in_use}, "
                f"waiting={len(self._waiters)}, maximum={self.maximum})")


class SubmitRateLearner:
    """Learns a provider's submit rate from its 429s and paces a :class:`TokenBucket` to it.

    Until the first 429 the bucket stays as configured (unlimited by default). A 429 means the
    provider's bucket is empty, so between two 429s it accepted exactly what it refilled:
    the submits accepted since an earlier 429, over the time since, *is* its rate, however
    fast or slow we sent meanwhile (only a bucket left full for long loses tokens). Each
    measured 429 (at least ``min_window`` after the previous one) takes that rate over the
    longest span of such marks within ``horizon`` seconds, so the estimate gets more exact as
    the run goes on and follows a provider that changes its limit.

    The first 429 has no earlier mark: the rate becomes what was accepted in the trailing
    seconds before it, over at least ``min_window`` (what the provider let through at full
    speed; it errs high by what was left of the provider's burst), and every submit waits out
    that first ``Retry-After``. A run that opens with more submits than the provider's bucket
    holds meets it within moments: what got through is that bucket, about a second of the
    rate at the usual size, and pacing to it at once keeps the submits after the pause from
    meeting the empty bucket again. Fewer than ``min_samples`` through measures nothing
    (another process on the same key took the burst; a storm). The next 429, a second or
    more later, is exact. Between 429s the rate grows (:meth:`growth_factor`), so a limit
    that was raised, or a share of a key that grew, is found again; it never exceeds a
    configured rate. A first estimate that is only a guess (from a burst, or a shard's) grows
    by ``burst_growth`` a second until a measured 429.

    ``sharers`` > 1: this is one of that many processes that started together on one key
    (the shards of a run). Their first 429s come together; each takes its share of the whole
    window since its start (the same for each), not of its last seconds (a lottery of who got
    through as the bucket emptied). What a shard measures later is the share it was pacing to
    (the others took the rest), so a low share confirms itself: one measured while the shard
    was held back (by its own pause, or by its in-flight cap while that was still opening)
    would stay low, and that shard would end long after the others. So a 429 lowers a
    shard's pace to no less than ``share_floor`` of what it was, and a shard probes upward
    by ``share_growth`` a second (a freed share is a large part of its own): a shard left
    low climbs back within seconds, and one paced too high comes down over a few 429s.

    429s answering requests sent before the latest adjustment, or within ``min_window`` of
    it, belong to the same episode and change nothing.
    """

    def __init__(self, bucket: TokenBucket, *, clock: Clock = time.monotonic,
                 growth: float = 0.01, min_window: float = 1.0, min_samples: int = 4,
                 horizon: float = 30.0, escalate: float = 5.0,
                 burst_growth: float = 0.1, sharers: int = 1, share_growth: float = 0.02,
                 share_floor: float = 0.6) -> None:
        self.bucket = bucket
        self.min_samples = min_samples
        self.ceiling = bucket.rate  # a configured rate is never exceeded
        self.sharers = max(1, sharers)
        self.growth = share_growth if self.sharers > 1 else growth
        self.share_floor = share_floor
        self.escalate = escalate
        self.burst_growth = burst_growth
        self.min_window = min_window
        self.horizon = horizon
        self._clock = clock
        self._window_start: float | None = None  # first submit, or when submits resumed
        self._accepted = 0  # accepted since _window_start (before the first mark)
        self._total = 0  # accepted in all
        self._marks: deque[tuple[float, int]] = deque()  # (time of a 429, _total then)
        self._episode_at = -math.inf
        self._base_rate: float | None = None
        self._base_time = 0.0
        # The learned rate is a first guess: a share of the provider's bucket (a first 429
        # within min_window of the window's start), or a shard's share of a window it ramped
        # up in. It grows by burst_growth a second until a measured 429 says what it is.
        self._provisional = False
        self._accepted_at: deque[float] = deque(maxlen=4096)
        #: ``(clock time, learned rate)`` at each 429 episode, for the run report.
        self.history: list[tuple[float, float]] = []

    def on_sent(self) -> None:
        """A submit is about to go out: start the first window; let the rate probe upward."""
        now = self._clock()
        if self._window_start is None:
            self._window_start = now
        if self._base_rate is not None:
            quiet = max(0.0, now - self._base_time)
            rate = self._base_rate * self.growth_factor(quiet)
            if self._provisional:
                rate = max(rate, self._base_rate * (1.0 + self.burst_growth) ** min(quiet, 60.0))
            if self.ceiling is not None:
                rate = min(rate, self.ceiling)
            current = self.bucket.rate
            if current is None or abs(rate - current) > 0.002 * current:
                self.bucket.set_rate(rate)

    def growth_factor(self, quiet: float) -> float:
        """How much the rate has grown after ``quiet`` seconds without a 429: by ``growth``
        per second at first, the growth itself doubling every ``escalate`` seconds. A run
        alone at the provider's limit meets a 429 within a second or two, so it probes
        gently; one whose share grew (the other processes on its key finished) finds the
        freed rate in seconds, not minutes."""
        g = math.log1p(self.growth)
        if quiet <= 0:
            return 1.0
        doublings = min(quiet / self.escalate, 20.0)
        exponent = g * self.escalate / math.log(2) * (2.0 ** doublings - 1.0)
        return math.exp(min(exponent, 50.0))  # a million-fold is as good as unlimited

    def on_accepted(self) -> None:
        self._accepted += 1
        self._total += 1
        self._accepted_at.append(self._clock())

    def on_rate_limited(self, *, sent_at: float, pause: float) -> Verdict:
        """A submit sent at ``sent_at`` was answered 429 with ``Retry-After: pause``.

        ``"first"``: the first measured 429: the rate was set, and every submit should wait
        out ``pause``. ``"measured"``: the rate was re-measured; pace to it (the submit that
        met the 429 waits its own ``Retry-After``). ``"same"``: part of an episode already
        handled. ``"unmeasured"``: too few submits got through since the last 429 to tell a
        rate (a storm, an outage): every submit should wait out ``pause``.
        """
        if sent_at < self._episode_at:
            return "same"
        now = self._clock()
        if self._marks and now - self._marks[-1][0] < self.min_window:
            return "same"
        since_last = self._total - self._marks[-1][1] if self._marks else self._accepted
        start = self._window_start if self._window_start is not None else now
        if since_last < self.min_samples:
            # Pacing to that number would crawl. A pause the provider asked for without its
            # bucket being the reason (a storm) says nothing of its rate either: start over,
            # measuring from when submits resume.
            self._marks.clear()
            self._window_start, self._accepted, self._episode_at = now + max(0.0, pause), 0, now
            return "unmeasured"
        if not self._marks:
            # Submits resumed after a pause can meet an empty bucket at once: measure over at
            # least min_window (never over nothing), and count the trailing submits over the
            # span they are divided by.
            window = max(self.min_window, now - start)
            verdict: Verdict = "first"
            if self.sharers > 1:
                # Processes on one key that started together have each had about the same
                # share of the whole window, but not of its last seconds (who got through as
                # the bucket emptied is a lottery), and a low share confirms itself (see the
                # class docstring). The whole window's share errs low while they ramped up:
                # it grows fast until a measured 429.
                rate, self._provisional = self._accepted / window, True
            else:
                span = min(2 * self.min_window, window)
                recent = sum(1 for t in self._accepted_at if t >= now - span)
                rate = max(self._accepted / window, recent / span)
                self._provisional = now - start < self.min_window
        else:
            while len(self._marks) > 1 and now - self._marks[1][0] >= self.horizon:
                self._marks.popleft()
            since, count = self._marks[0]
            rate = (self._total - count) / (now - since)
            verdict = "measured"
            self._provisional = False
        if self.sharers > 1 and self.bucket.rate is not None:
            rate = max(rate, self.share_floor * self.bucket.rate)
        if self.ceiling is not None:
            rate = min(rate, self.ceiling)
        rate = max(rate, 1.0 / 60.0)
        self.bucket.set_rate(rate)
        self._base_rate, self._base_time = rate, now + (pause if verdict == "first" else 0.0)
        self._marks.append((now, self._total))
        self._episode_at = now
        self.history.append((now, rate))
        return verdict

    @property
    def learned(self) -> float | None:
        """The rate learned from the 429s so far, before growth (None: none learned)."""
        return self._base_rate

    def at_least(self, rate: float) -> bool:
        """Raise a learned rate below ``rate`` to it (never past a configured rate); True when
        it was raised. For a floor the provider itself showed (:meth:`SubmitGate.ended`)."""
        if self._base_rate is None or self._base_rate >= rate:
            return False
        if self.ceiling is not None:
            rate = min(rate, self.ceiling)
        now = self._clock()
        self._base_rate, self._base_time = rate, now
        self.bucket.set_rate(rate)
        self.history.append((now, rate))
        return True

    def forget(self) -> None:
        """The 429s came from another limit (an in-flight cap): back to the configured rate,
        and measure afresh if a rate limit shows later."""
        self.bucket.set_rate(self.ceiling)
        self._base_rate, self._provisional = None, False
        self._marks.clear()
        self._window_start, self._accepted = self._clock(), 0

    def restore(self, rate: float | None) -> None:
        """Undo the last estimate (the 429 turned out to come from another limit)."""
        self.bucket.set_rate(rate)
        self._base_rate = rate
        if self.history:
            self.history.pop()
        if self._marks:
            self._marks.pop()


class CapDetector:
    """Tells a provider's in-flight cap from its rate limit, after the fact.

    Both answer a submit with 429, and in a steady state both look alike from outside (jobs in
    flight = rate x duration). What differs is the provider's own count of running jobs at
    the moment of each 429: under a cap it is the cap every time. That count is known exactly
    once the jobs running then have ended: the jobs whose span (submit to the provider's
    end) contains the moment. :meth:`cap` counts it for the latest 429s old enough to be
    settled, and reports a cap when ``agree`` of them in a row found the same number.

    >>> caps = CapDetector()
    >>> for n, second in enumerate((10.0, 12.0, 14.0)):   # three 429s, two jobs running at each
    ...     caps.started(2 * n, at=second - 1.0)
    ...     caps.started(2 * n + 1, at=second - 0.5)
    ...     caps.limited(second)
    ...     caps.ended(2 * n, second + 1.0)
    ...     caps.ended(2 * n + 1, second + 1.0)
    >>> caps.cap(now=30.0)
    2
    """

    def __init__(self, *, agree: int = 3, gap: float = 1.0, size: int = 4096) -> None:
        if agree < 2:
            raise ValueError("agree must be at least 2")
        self.agree = agree
        self.gap = gap
        self._limited_last: float | None = None
        self._spans: deque[tuple[float, float]] = deque(maxlen=size)
        self._open: dict[int, float] = {}  # jobs submitted and not yet ended: token -> start
        self._limited: deque[float] = deque(maxlen=64)
        self._counts: deque[int] = deque(maxlen=agree)
        self._longest = 0.0
        #: How many 429s have settled.
        self.settles = 0

    def started(self, token: int, at: float) -> None:
        """A job was accepted at ``at`` (``token`` names it until :meth:`ended`)."""
        self._open[token] = at

    def ended(self, token: int, end: float | None) -> None:
        """The job ended at ``end`` on our clock (None: unknown, e.g. lost or abandoned)."""
        start = self._open.pop(token, None)
        if start is not None and end is not None and end >= start:
            self._spans.append((start, end))
            self._longest = max(self._longest, end - start)

    def limited(self, at: float) -> None:
        """A submit was answered 429 at ``at``. Only one 429 a ``gap`` counts: the 429s of
        one burst all meet the same count, which says nothing of a cap."""
        if self._limited_last is None or at - self._limited_last >= self.gap:
            self._limited.append(at)
            self._limited_last = at

    def cap(self, now: float) -> int | None:
        """The provider's cap, when the settled 429s agree on one; else None."""
        settle = 1.5 * self._longest + 0.5
        while self._limited and self._limited[0] <= now - settle:
            moment = self._limited.popleft()
            running = sum(1 for start, end in self._spans if start <= moment < end)
            running += sum(1 for start in self._open.values() if start <= moment)
            self._counts.append(running)
            self.settles += 1
        if len(self._counts) == self.agree and len(set(self._counts)) == 1 \
                and self._counts[0] > 0:
            return self._counts[0]
        return None

    @property
    def steady(self) -> int | None:
        """The running count of the last two settled 429s when they agree (what a cap shows
        before :meth:`cap` is sure of it), else None."""
        counts = list(self._counts)[-2:]
        if len(counts) == 2 and counts[0] == counts[1] > 0:
            return counts[0]
        return None

    def job_seconds(self) -> float | None:
        """The median time of the recent jobs, submit to end (None before the first)."""
        if not self._spans:
            return None
        return statistics.median(end - start for start, end in list(self._spans)[-64:])


class Budget:
    """The credits a run may commit, kept exact while many workers submit at once.

    A submit :meth:`reserve`\\ s the expected cost before it waits for a token (so workers
    waiting together cannot overshoot), then either :meth:`settle`\\ s it with what the job
    really cost (nothing for a job another run created: an idempotent replay) or
    :meth:`release`\\ s it when no job resulted. ``limit`` None: no budget.

    >>> budget = Budget(5.0, cost=2.0)
    >>> budget.reserve(), budget.reserve(), budget.reserve()
    (True, True, False)
    >>> budget.settle(2.0); budget.release(); budget.committed
    2.0
    """

    __slots__ = ("committed", "cost", "limit")

    def __init__(self, limit: float | None, *, cost: float) -> None:
        self.limit = limit
        self.cost = cost
        #: Credits reserved or spent so far.
        self.committed = 0.0

    def reserve(self) -> bool:
        """Reserve one job's expected cost; False (nothing reserved) when it would pass
        the limit."""
        if self.limit is not None and self.committed + self.cost > self.limit:
            return False
        self.committed += self.cost
        return True

    def release(self) -> None:
        """Give a reservation back: no job resulted."""
        self.committed -= self.cost

    def settle(self, cost: float) -> None:
        """Replace a reservation by what the job cost this run."""
        self.committed += cost - self.cost


#: A learned submit rate under ``RATE_SHADOW`` x ``running / job time`` (two agreeing settled
#: 429s' count, Little's law) is a cap's shadow, and is raised to ``RATE_FLOOR_SHARE`` x that.
#: Under a real rate limit the two are within a few percent of each other (the count at a
#: 429 is at its peak, just after a burst), so neither threshold is met there.
RATE_SHADOW = 0.8
RATE_FLOOR_SHARE = 0.9


class SubmitGate:
    """Everything that decides when the next job may be submitted, shared by every worker.

    - :attr:`inflight`: the in-flight cap (slow start from ``initial`` up to ``ceiling``, then
      AIMD; pinned when the provider reveals a cap, :class:`CapDetector`);
    - :attr:`bucket` paced by :attr:`learner` to the provider's submit rate (or ``rate``);
    - the pauses 429s ask for: :attr:`submit_pause` (submits only: polls and downloads free the
      provider's capacity) and :attr:`pause` (every request, after a 429 on a poll or download);
    - :attr:`jobs_open`: jobs accepted and not yet seen finished (what the provider has).

    :meth:`throttle` is awaited before every submit attempt; :meth:`rate_limited` is told of
    every 429 (with the route and when the request was sent); :meth:`accepted` and
    :meth:`ended` bracket each job.
    """

    def __init__(self, *, ceiling: int, initial: int | None = None,
                 rate: float | None = None, sharers: int = 1, clock: Clock = time.monotonic,
                 sleep: Sleep = anyio.sleep) -> None:
        start = min(ceiling, initial if initial is not None else ceiling)
        self._clock = clock
        self.inflight = AdaptiveLimit(start, maximum=ceiling, clock=clock,
                                      slow_start=start < ceiling)
        self.bucket = TokenBucket(rate, clock=clock, sleep=sleep)
        self.learner = SubmitRateLearner(self.bucket, clock=clock, sharers=sharers)
        self.caps = CapDetector()
        self.pause = Cooldown(clock=clock, sleep=sleep)
        self.submit_pause = Cooldown(clock=clock, sleep=sleep)
        self.jobs_open = 0
        #: Submits answered 429.
        self.submit_429 = 0
        self._tokens = 0

    async def throttle(self) -> None:
        """Wait until a submit may go: no pause in force, and a token of the submit rate."""
        while True:
            await self.submit_pause.wait()
            self.learner.on_sent()
            await self.bucket.acquire()
            if not self.submit_pause.is_active:
                return

    def accepted(self) -> int:
        """A submit was accepted: returns the token that names its job until :meth:`ended`."""
        self.learner.on_accepted()
        self._tokens += 1
        self.caps.started(self._tokens, self._clock())
        return self._tokens

    def ended(self, token: int, end: float | None) -> None:
        """The job named by ``token`` ended at ``end`` on our clock (None: unknown). When the
        jobs running at earlier 429s have ended and reveal a cap, it is pinned, and the rate
        learned from its 429s is forgotten (they were no rate limit)."""
        self.caps.ended(token, end)
        settles = self.caps.settles
        cap = self.caps.cap(self._clock())
        if cap is not None and (self.inflight.maximum != cap or self.inflight.limit != cap):
            self.inflight.pin(cap)
            self.learner.forget()
        elif self.caps.settles != settles:
            self._rate_floor(self.caps.steady)

    def _rate_floor(self, running: int | None) -> None:
        """The last two settled 429s both found ``running`` jobs at the provider (as a cap
        shows, before three make it sure): the provider then finishes, so accepts, about
        ``running / job time`` a second (Little's law). A rate measured below that, a margin
        kept, is the shadow of that cap being filled (jobs not yet ending), not a rate limit:
        raise it. Only a rate well below it (:data:`RATE_SHADOW`) is: under a real rate limit
        the count at a 429 is at its peak (just after a burst), near ``rate x job time``, and
        raising a rate to it would only meet more 429s."""
        seconds = self.caps.job_seconds()
        learned = self.learner.learned
        if running is None or running <= 0 or seconds is None or seconds <= 0 \
                or learned is None or learned >= RATE_SHADOW * running / seconds:
            return
        self.learner.at_least(RATE_FLOOR_SHARE * running / seconds)

    def rate_limited(self, *, submit: bool, retry_after: float | None, sent_at: float) -> None:
        """A request met a 429.

        On a submit: a rate limit is paced, not paused for (the learner measures the rate
        and the request that met the 429 waits its own Retry-After, as the official SDK's
        would); the first 429 of a run and one that says nothing of a rate (a storm, an
        outage) pause every submit; a revealed cap's own 429s (a job ended later than we saw)
        teach nothing. On a poll or download: every request pauses, and the in-flight cap
        halves once per episode.
        """
        pause = retry_after if retry_after is not None else 1.0
        if not submit:
            self.pause.trigger(pause)
            self.inflight.on_rate_limited()
            return
        self.submit_429 += 1
        self.caps.limited(self._clock())
        pinned = self.inflight.pinned
        if pinned is not None and self.jobs_open >= pinned - 1:
            return
        verdict = self.learner.on_rate_limited(sent_at=sent_at, pause=pause)
        if verdict in ("first", "unmeasured"):
            self.submit_pause.trigger(pause)

    @property
    def waiting_for_rate_limit(self) -> float:
        """Seconds left of the longest pause in force (for the progress display)."""
        return max(self.pause.remaining, self.submit_pause.remaining)
