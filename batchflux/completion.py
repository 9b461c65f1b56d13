"""How a run learns that a job ended: a completion source.

The item lifecycle (:mod:`batchflux.lifecycle`) hands each accepted job to a
:class:`CompletionSource` and gets back its terminal state. Polling
(:class:`PollingCompletion`) is one source: it asks ``GET /v2/jobs/{id}`` on the schedule
:func:`batchflux.retry.next_poll_delay` computes from what recent jobs taught
(:class:`batchflux.retry.JobTimings`). Another source (Apiframe's signed webhooks, with a
sparse poll as the safety net) plugs in behind the same Protocol without touching the pool.

>>> source = PollingCompletion(fetch=fetch, timings=JobTimings())       # doctest: +SKIP
>>> state = await source.wait(Waiting("3f2b8c1e-...", submitted=now, deadline=now + 600))
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from .errors import ApiError
from .models import ErrorCategory
from .retry import TERMINAL_STATUSES, JobTimings, PollPolicy, Sighting, next_poll_delay

__all__ = ["CompletionSource", "JobLike", "PollingCompletion", "Waiting"]


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


Fetch = Callable[[str, float], Awaitable[JobLike]]


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
            try:
                state = await self._fetch(job.job_id, job.deadline)
            except ApiError as exc:
                if exc.category is ErrorCategory.LOST:
                    return None
                raise
            job.sightings.append(Sighting(self._clock() - job.submitted, state.status,
                                          state.progress))
            if state.status in TERMINAL_STATUSES:
                return state
