"""How a run learns that a job ended: a completion source.

The item lifecycle (:mod:`batchflux.lifecycle`) hands each accepted job to a
:class:`CompletionSource` and gets back its terminal state. Two sources:

- :class:`PollingCompletion` asks ``GET /v2/jobs/{id}`` on the schedule
  :func:`batchflux.retry.next_poll_delay` computes from what recent jobs taught
  (:class:`batchflux.retry.JobTimings`).
- :class:`WebhookCompletion` waits for the job's signed webhook (Apiframe POSTs it to the
  run's receiver, :mod:`batchflux.webhooks`, which drops it in a :class:`WebhookMailbox`) and
  uses the event as the job's terminal state, with no request at all. A sparse fallback poll
  (:func:`fallback_delay`: about 1.5x the learned job time, then backing off) is the safety
  net for an event that never comes; when no webhook arrives at all, it polls as
  :class:`PollingCompletion` does.

In the lifecycle (``fetch`` is one ``GET /v2/jobs/{id}`` with the run's retries)::

    source = PollingCompletion(fetch=fetch, timings=JobTimings())
    state = await source.wait(Waiting(job_id, submitted=now, deadline=now + 600))
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import anyio

from .errors import ApiError
from .models import ErrorCategory
from .retry import TERMINAL_STATUSES, JobTimings, PollPolicy, Sighting, next_poll_delay
from .stats import parse_time

__all__ = [
    "WEBHOOK_EVENTS",
    "CompletionSource",
    "FallbackPolicy",
    "JobEvent",
    "JobLike",
    "PollingCompletion",
    "Waiting",
    "WebhookCompletion",
    "WebhookCounters",
    "WebhookMailbox",
    "fallback_delay",
]

#: The webhook events a run subscribes to: a job's end, either way.
WEBHOOK_EVENTS = ("completed", "failed")


class JobLike(Protocol):
    """What the run reads of a job (``apiframe.JobState`` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def progress(self) -> int | None: ...
    @property
    def images(self) -> tuple[str, ...]: ...
    @property
    def error(self) -> str | None: ...
    @property
    def credit_cost(self) -> int | None: ...
    @property
    def created_at(self) -> str | None: ...
    @property
    def completed_at(self) -> str | None: ...
    @property
    def expired(self) -> bool: ...


@dataclass(slots=True)
class Waiting:
    """One job being waited on: its id, when it was submitted (or re-attached) on the run's
    clock, its deadline, and what was seen of it so far."""

    job_id: str
    submitted: float
    deadline: float
    attached: bool = False  # re-attached from the journal: it may be long done
    sightings: list[Sighting] = field(default_factory=list)


class CompletionSource(Protocol):
    """Where the end of a job comes from."""

    async def wait(self, job: Waiting) -> JobLike | None:
        """The job's terminal state (COMPLETED, FAILED or CANCELLED), or None when the API
        does not know the job (it forgets jobs after about 24 h). Raises
        :class:`~batchflux.errors.ApiError`: the job's deadline passed (``timeout``), or
        asking about it failed for good."""
        ...

    def summary(self) -> Mapping[str, Any]:
        """Sections this source adds to summary.json (empty when it has nothing to tell)."""
        ...


Fetch = Callable[[str, float], Awaitable[JobLike]]


async def _poll_once(fetch: Fetch, job: Waiting,
                    clock: Callable[[], float]) -> JobLike | None:
    """Ask the API once for ``job`` and record what it said as a :class:`Sighting`; None
    when the API no longer knows the job (``lost``: the caller submits anew)."""
    try:
        state = await fetch(job.job_id, job.deadline)
    except ApiError as exc:
        if exc.category is ErrorCategory.LOST:
            return None
        raise
    job.sightings.append(Sighting(clock() - job.submitted, state.status, state.progress))
    return state


class PollingCompletion:
    """Poll each job until it ends, on the schedule :func:`next_poll_delay` computes.

    ``fetch(job_id, deadline)`` asks the API once, with the run's retries and pauses (the
    lifecycle provides it); ``timings`` is shared by every job of the run and taught by the
    lifecycle as jobs end; ``expected`` is a guess of the job time before any job ended.
    """

    def __init__(self, *, fetch: Fetch, timings: JobTimings,
                 policy: PollPolicy | None = None, expected: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        self._fetch = fetch
        self.timings = timings
        self.policy = policy or PollPolicy()
        self.expected = expected
        self._clock = clock
        self._sleep = sleep

    async def wait(self, job: Waiting) -> JobLike | None:
        """See :meth:`CompletionSource.wait`."""
        while True:
            if job.attached and not job.sightings:
                delay = 0.0
            else:
                delay = next_poll_delay(self.policy, self.timings, job.sightings,
                                        elapsed=self._clock() - job.submitted,
                                        expected=self.expected)
            remaining = job.deadline - self._clock()
            if remaining <= 0:
                raise ApiError(f"job {job.job_id} not finished by its deadline",
                               category=ErrorCategory.TIMEOUT, retryable=True)
            await self._sleep(min(delay, remaining))
            state = await _poll_once(self._fetch, job, self._clock)
            if state is None or state.status in TERMINAL_STATUSES:
                return state

    def summary(self) -> Mapping[str, Any]:
        """Nothing beyond what the run counts itself (polls are in ``requests``)."""
        return {}


# --------------------------------------------------------------------------------------------
# Webhooks: the mailbox where events meet waiting jobs, and the source that waits on it


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A job's state as a verified webhook told it: a :class:`JobLike`, so the lifecycle reads
    it as it reads a polled job. Webhooks carry no ``createdAt`` and no ``expired`` (a job that
    just ended has not expired)."""

    id: str
    status: str
    progress: int | None
    images: tuple[str, ...]
    error: str | None
    credit_cost: int | None
    completed_at: str | None
    created_at: str | None = None
    expired: bool = False
    event: str = "completed"

    @property
    def is_terminal(self) -> bool:
        """True for a job's end (``completed``/``failed``), False for ``progress``."""
        return self.status in TERMINAL_STATUSES


@dataclass
class WebhookCounters:
    """What the receiver and the webhook source counted (summary.json's ``webhooks``).

    Requests: ``received`` POSTs on the receiver's path, of which ``verified`` carried a valid
    signature, ``rejected`` a missing or wrong one (401), ``malformed`` were too large or not an
    event (413/400). Verified events: ``unknown`` were for a job no item of this run waited on,
    ``duplicates`` repeated an event already had, ``late`` came after a fallback poll had found
    the job's end, ``ignored`` were not a job's end (``progress``). Jobs: ``jobs_by_webhook``
    ended by their event (no request), ``jobs_by_poll`` were found ended by a poll first.
    Polls: ``fallback_polls`` asked about a job whose event had not come, ``reattach_polls``
    asked about a job re-attached from the journal (its event may have fired while no run
    listened). ``polling`` tells whether the source fell back to polling every job, because
    webhooks were not arriving.
    """

    received: int = 0
    verified: int = 0
    rejected: int = 0
    malformed: int = 0
    unknown: int = 0
    duplicates: int = 0
    late: int = 0
    ignored: int = 0
    jobs_by_webhook: int = 0
    jobs_by_poll: int = 0
    fallback_polls: int = 0
    reattach_polls: int = 0
    polling: bool = False

    def to_json(self) -> dict[str, Any]:
        """The counters as summary.json shows them."""
        return asdict(self)


class _Slot:
    """One waiting job's place in the mailbox: its event, once it came, and a wake-up call."""

    __slots__ = ("event", "state")

    def __init__(self, state: JobEvent | None = None) -> None:
        self.state = state
        self.event = anyio.Event()

    def wake(self) -> None:
        self.event.set()

    def rearm(self) -> None:
        if self.event.is_set():
            self.event = anyio.Event()


class WebhookMailbox:
    """Where verified events meet the jobs waiting for them (one per run).

    The receiver calls :meth:`deliver` for each verified event; a job's waiter :meth:`claim`s
    its slot before waiting and :meth:`release`s it after. An event that comes before its job
    is claimed (the job ended in the moment between the submit's answer and the wait, or it is
    a journaled job the run has not re-attached yet) is kept, up to ``memory`` of them, for
    the claim; one never claimed counts as ``unknown``. The ids of the last ``memory`` jobs
    that ended are kept to tell a repeated or late event from an unknown one.
    """

    def __init__(self, *, memory: int = 4096) -> None:
        self.counters = WebhookCounters()
        self._memory = memory
        self._slots: dict[str, _Slot] = {}
        self._early: OrderedDict[str, JobEvent] = OrderedDict()
        self._ended: OrderedDict[str, bool] = OrderedDict()  # job id -> its event came
        self._forgotten = 0  # early events pushed out of memory unclaimed

    def deliver(self, event: JobEvent) -> None:
        """Hand a verified event to the job waiting for it (or keep it for the claim)."""
        counters = self.counters
        if not event.is_terminal:
            counters.ignored += 1
            return
        slot = self._slots.get(event.id)
        if slot is not None:
            if slot.state is not None:
                counters.duplicates += 1
                return
            slot.state = event
            slot.wake()
            return
        if event.id in self._ended:
            if self._ended[event.id]:
                counters.duplicates += 1
            else:
                counters.late += 1
                self._ended[event.id] = True
            return
        if event.id in self._early:
            counters.duplicates += 1
            return
        self._early[event.id] = event
        if len(self._early) > self._memory:
            self._early.popitem(last=False)
            self._forgotten += 1
        counters.unknown = len(self._early) + self._forgotten

    def claim(self, job_id: str) -> _Slot:
        """The slot a job waits in (holding its event already, if it came early)."""
        early = self._early.pop(job_id, None)
        if early is not None:
            self.counters.unknown = len(self._early) + self._forgotten
        slot = self._slots[job_id] = _Slot(early)
        return slot

    def release(self, job_id: str, *, by_webhook: bool) -> None:
        """The job's wait is over (``by_webhook``: its event ended it)."""
        self._slots.pop(job_id, None)
        self._ended[job_id] = by_webhook
        self._ended.move_to_end(job_id)
        if len(self._ended) > self._memory:
            self._ended.popitem(last=False)

    def wake_all(self) -> None:
        """Wake every waiting job so that it looks at its schedule again."""
        for slot in self._slots.values():
            slot.wake()

    def wake_first(self, *, but: str | None = None) -> None:
        """Wake the job that has waited longest, ``but`` that one (it looks at its schedule
        again)."""
        for job_id, slot in self._slots.items():
            if job_id != but:
                slot.wake()
                return

    def is_waiting(self, job_id: str) -> bool:
        """True while ``job_id`` waits in the mailbox."""
        return job_id in self._slots

    @property
    def waiting(self) -> int:
        """Jobs waiting now."""
        return len(self._slots)


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    """When a job whose webhook has not come is polled anyway (:func:`fallback_delay`).

    - ``factor``: the first fallback poll comes ``factor`` x the learned job time after the
      submit, and at least ``margin`` seconds after that time (a webhook may take a moment).
    - ``cold``: the first fallback poll before any job time is learned (the run's first jobs).
    - ``growth`` / ``max_interval``: later fallback polls back off geometrically, at most
      ``max_interval`` apart.
    - ``quiet_jobs``: once this many jobs were found ended by a poll and no webhook came at
      all, or fewer than ``min_share`` of the last ``window`` jobs ended by their webhook, every
      job is polled as polling mode does (and webhooks, when they come, still end a wait).
    """

    factor: float = 1.5
    margin: float = 1.0
    cold: float = 15.0
    growth: float = 1.5
    max_interval: float = 60.0
    quiet_jobs: int = 20
    window: int = 50
    min_share: float = 0.5

    def __post_init__(self) -> None:
        if self.factor < 1.0 or self.growth < 1.0:
            raise ValueError("factor and growth must be >= 1")
        if self.cold <= 0 or self.max_interval <= 0 or self.margin < 0:
            raise ValueError("cold and max_interval must be > 0, margin >= 0")
        if self.quiet_jobs < 1 or self.window < 1 or not 0 <= self.min_share <= 1:
            raise ValueError("quiet_jobs and window must be >= 1, min_share in [0, 1]")


def fallback_delay(policy: FallbackPolicy, expected: float | None, *, polls: int,
                   elapsed: float) -> float:
    """Seconds until a job whose webhook has not come is polled: the ``polls``-th fallback
    poll (0 for the first) is due ``first x growth^polls`` seconds after the submit (the
    gaps capped at ``max_interval``), where ``first`` is ``max(factor x expected, expected +
    margin)``, or ``cold`` while no job time is known.

    >>> fallback_delay(FallbackPolicy(), 10.0, polls=0, elapsed=4.0)
    11.0
    >>> fallback_delay(FallbackPolicy(), 10.0, polls=1, elapsed=15.0)
    7.5
    """
    due = policy.cold if expected is None else max(policy.factor * expected,
                                                   expected + policy.margin)
    for _ in range(polls):
        due = min(due * policy.growth, due + policy.max_interval)
    return max(0.0, due - elapsed)


class WebhookCompletion:
    """Wait for each job's webhook; poll only when it is late (a :class:`CompletionSource`).

    ``mailbox`` is where the run's receiver drops verified events; ``fetch`` asks the API once
    (with the run's retries, as for :class:`PollingCompletion`); ``timings``, ``policy`` and
    ``expected`` drive the polling schedule used when webhooks do not arrive at all;
    ``fallback`` the sparse schedule otherwise. The fallback schedule follows the median time
    of the last jobs that ended, and each due poll is checked against it again when it comes
    (early in a run the median grows as slower jobs end). A job's time is learned from the
    API's timestamps (a webhook's ``completedAt`` against the submit's time on ``wall``, the
    Unix clock), so a webhook that comes late does not stretch it. ``say`` tells the user,
    once, when no webhook came for the first ``fallback.quiet_jobs`` jobs (``url`` names the
    address).
    """

    def __init__(self, *, mailbox: WebhookMailbox, fetch: Fetch, timings: JobTimings,
                 policy: PollPolicy | None = None, fallback: FallbackPolicy | None = None,
                 expected: float | None = None, url: str = "the webhook URL",
                 say: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
                 wall: Callable[[], float] = time.time) -> None:
        self.mailbox = mailbox
        self.counters = mailbox.counters
        self._fetch = fetch
        self.timings = timings
        self.policy = policy or PollPolicy()
        self.fallback = fallback or FallbackPolicy()
        self.expected = expected
        self._url = url
        self._say = say
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._durations: deque[float] = deque(maxlen=63)
        self._outcomes: deque[bool] = deque(maxlen=self.fallback.window)
        self._warned = False
        self._canary: str | None = None

    async def wait(self, job: Waiting) -> JobLike | None:
        """See :meth:`CompletionSource.wait`."""
        slot = self.mailbox.claim(job.job_id)
        by_webhook = False
        due: float | None = None  # when the next poll is due, on the run's clock
        try:
            while True:
                if slot.state is not None:
                    by_webhook = True
                    self._ended(job, slot.state, by_webhook=True)
                    return slot.state
                now = self._clock()
                remaining = job.deadline - now
                if remaining <= 0:
                    raise ApiError(f"job {job.job_id} not finished by its deadline",
                                   category=ErrorCategory.TIMEOUT, retryable=True)
                if due is None:
                    delay, sparse = self._delay(job)
                    due = now + delay
                elif due <= now and sparse:
                    # A fallback poll falls due: is it still, by what was learned since?
                    delay, sparse = self._delay(job)
                    if sparse:
                        due = max(due, now + delay)
                if due > now:
                    if not await self._wait_for(slot, min(due - now, remaining)):
                        due = None  # woken by an event or a new schedule: look again
                    continue
                due = None
                state = await self._poll(job)
                if state is None:
                    return None
                if state.status in TERMINAL_STATUSES:
                    by_webhook = slot.state is not None  # its event came during the poll
                    self._ended(job, state, by_webhook=by_webhook)
                    return state
        finally:
            self.mailbox.release(job.job_id, by_webhook=by_webhook)

    def summary(self) -> Mapping[str, Any]:
        """summary.json's ``webhooks``: what :class:`WebhookCounters` counted."""
        return {"webhooks": self.counters.to_json()}

    # -- the schedule ------------------------------------------------------------------------

    def _delay(self, job: Waiting) -> tuple[float, bool]:
        """Seconds until the job's next poll, and whether that is the sparse fallback
        schedule (a due time fixed since the submit, checked again when it comes) rather
        than a polling-mode wait (slept, then polled)."""
        elapsed = self._clock() - job.submitted
        if job.attached and not job.sightings:
            return 0.0, False  # re-attached: it may have ended while no run listened
        expected = self._expected()
        if self.counters.polling or (expected is None and self._is_canary(job.job_id)):
            return next_poll_delay(self.policy, self.timings, job.sightings, elapsed=elapsed,
                                   expected=self.expected), False
        polls = len(job.sightings) - (1 if job.attached else 0)
        return fallback_delay(self.fallback, expected, polls=polls, elapsed=elapsed), True

    def _is_canary(self, job_id: str) -> bool:
        """While no job time is known, one job (the oldest waiting) is polled as polling mode
        polls: if webhooks are not arriving, its end teaches the job time the others' fallback
        polls wait for; if they are, it costs a poll or two a run."""
        if self._canary is None or not self.mailbox.is_waiting(self._canary):
            self._canary = job_id
        return self._canary == job_id

    def _expected(self) -> float | None:
        """The median time of the last jobs that ended (three at least), else the guess."""
        if len(self._durations) >= 3:
            return statistics.median(self._durations)
        return None if self.expected is None else self.expected

    async def _wait_for(self, slot: _Slot, seconds: float) -> bool:
        """Until the slot is woken or ``seconds`` pass (on the injected clock); True when the
        time passed (a due poll), False when woken."""
        expired = False
        if not slot.event.is_set():
            async with anyio.create_task_group() as tg:
                async def timer() -> None:
                    nonlocal expired
                    await self._sleep(seconds)
                    expired = True
                    tg.cancel_scope.cancel()

                tg.start_soon(timer)
                await slot.event.wait()
                tg.cancel_scope.cancel()
        slot.rearm()
        return expired

    async def _poll(self, job: Waiting) -> JobLike | None:
        if job.attached and not job.sightings:
            self.counters.reattach_polls += 1
        else:
            self.counters.fallback_polls += 1
        return await _poll_once(self._fetch, job, self._clock)

    # -- learning ----------------------------------------------------------------------------

    def _ended(self, job: Waiting, state: JobLike, *, by_webhook: bool) -> None:
        counters = self.counters
        if by_webhook:
            counters.jobs_by_webhook += 1
        else:
            counters.jobs_by_poll += 1
        seen = self._clock() - job.submitted
        duration = _duration(state, seen, submitted=self._wall() - seen, seen_at_end=by_webhook)
        if not job.attached and duration is not None:
            known = self._expected() is not None
            self._durations.append(duration)
            if not known and self._expected() is not None:
                self.mailbox.wake_all()  # the first job times: every schedule changes
        if job.job_id == self._canary:
            self._canary = None
            if self._expected() is None:
                self.mailbox.wake_first(but=job.job_id)  # the oldest waiting is the next
        self._outcomes.append(by_webhook)
        policy = self.fallback
        quiet = counters.verified == 0 and counters.jobs_by_poll >= policy.quiet_jobs
        if quiet and not self._warned and self._say is not None:
            self._warned = True
            self._say(f"no webhook received for the first {counters.jobs_by_poll} jobs: is "
                      f"{self._url} reachable from the internet? Polling every job instead "
                      "(a webhook that comes still ends its job's wait)")
        share = sum(self._outcomes) / len(self._outcomes)
        polling = quiet or (len(self._outcomes) >= policy.quiet_jobs
                            and share < policy.min_share)
        if polling != counters.polling:
            counters.polling = polling
            self.mailbox.wake_all()


def _duration(state: JobLike, seen: float, *, submitted: float,
              seen_at_end: bool) -> float | None:
    """A job's time from its creation to its end: ``createdAt`` to ``completedAt`` when the
    state has both (a polled job), else the submit's Unix time (``submitted``) to
    ``completedAt`` (a webhook), else ``seen`` (the time from the submit to when its end was
    seen) when that was at its end (``seen_at_end``: a webhook), else None: a poll that
    found a job ended tells only that it took at most ``seen``."""
    created, completed = parse_time(state.created_at), parse_time(state.completed_at)
    start = submitted if created is None else created
    if completed is not None and 0 <= completed - start <= seen:
        return completed - start
    return seen if seen_at_end else None
