"""The item lifecycle: one item from where it stands to its result line.

::

    resume point -> [upload references] -> submit (journal intent, then jobId) -> wait
        (a completion source) -> download -> verify -> rename into place -> Result

*Never pay twice*: a job the journal or an earlier result knows is waited on, not paid for
again; a submit that may have created a job we never heard of is resent with the same
``Idempotency-Key`` and the same body (its upload URLs come from the journal), so the API
answers with that job; only a job that ended for good (FAILED, expired, cancelled, lost)
earns a new submission number. *Never lose a result*: the jobId is journaled before anyone
waits on it, and an image gets its final name only once verified; the result line comes
after.

The lifecycle sees the API, the run directory and the pool through the Protocols below
(:class:`ApiClient`, :class:`ItemStore`, :class:`RunControl`) and the shared limits through
:class:`~batchflux.limits.SubmitGate` and :class:`~batchflux.limits.Budget`; the pool
(:mod:`batchflux.runner`) runs many lifecycles at once.
"""

from __future__ import annotations

import hashlib
import random
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio

from .completion import CompletionSource, JobLike, Waiting
from .errors import EXIT_ITEMS_FAILED, ApiError, ImageCheckError, RunAborted
from .imagecheck import check_expected, image_size, inspect_container, inspect_image
from .limits import Budget, SubmitGate
from .models import (
    ErrorCategory,
    ErrorInfo,
    FileRecord,
    Result,
    Timings,
    WebhookRequest,
    WorkItem,
    is_remote_ref,
)
from .retry import JobTimings, RetryPolicy, Sighting, call_with_retries
from .stats import parse_time, rounded, utc_now
from .store import JournalIntent, JournalUpload, ResumeIndex

__all__ = ["ApiClient", "ItemStore", "Lifecycle", "LifecycleSettings", "LifecycleStats",
           "RunControl", "TempFile", "is_capacity_failure"]

T = TypeVar("T")

#: Failures that left a job which may still be good: a retry re-attaches to it first.
REATTACH_CATEGORIES = frozenset(
    c.value for c in (ErrorCategory.TIMEOUT, ErrorCategory.NETWORK, ErrorCategory.SERVER_ERROR,
                      ErrorCategory.RATE_LIMITED, ErrorCategory.DOWNLOAD_FAILED)
)
CAPACITY_MARKERS = ("no available capacity", "capacity", "try again", "retry shortly")
#: A journaled submit older than this is not resent with its old key: the API keeps
#: idempotency keys for 24 h, and the old body's upload URLs are long gone.
IDEMPOTENCY_WINDOW = 23 * 3600.0
#: Upload URLs this close to expiry are not used for a new job (the API must still fetch them).
UPLOAD_MARGIN = 15 * 60.0
#: A job created this long before this run directory first sent its request (journaled, so a
#: resumed run knows) was created by someone else, such as another directory on the account:
#: the API replayed it and this directory did not pay for it.
REPLAY_SLACK = 2.0


# --------------------------------------------------------------------------------------------
# Seams


class ApiClient(Protocol):
    """What the lifecycle asks of the API (``apiframe.ApiframeClient`` is one)."""

    async def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None) -> Any: ...
    async def get_job(self, job_id: str) -> JobLike: ...
    async def download(self, url: str, sink: Any, *, max_bytes: int = ...) -> Any: ...
    async def upload(self, data: bytes, *, filename: str) -> Any: ...


class TempFile(Protocol):
    """A partial download: written chunk by chunk, hashed as it goes."""

    path: Path

    async def write(self, data: bytes) -> None: ...


class ItemStore(Protocol):
    """What the lifecycle writes to the run directory (``store.RunStore`` is one)."""

    def journal_intent(self, item: WorkItem, submission: int,
                       inputs: Sequence[str] | None = None,
                       webhook: WebhookRequest | None = None) -> None: ...
    def journal_job(self, item: WorkItem, submission: int, job_id: str) -> None: ...
    def journal_lost(self, item: WorkItem, submission: int, job_id: str) -> None: ...
    def journal_upload(self, sha256: str, url: str, expires_at: str | None) -> None: ...
    def temp_image(self, item: WorkItem, number: int) -> AbstractAsyncContextManager[Any]: ...
    async def commit_image(self, temp: Any, item: WorkItem, *, ext: str, number: int,
                           width: int, height: int, fmt: str,
                           check: str = ...) -> FileRecord: ...


class RunControl(Protocol):
    """The pool's side of a lifecycle: whether the run is stopping, and how to stop it."""

    @property
    def stopping(self) -> bool: ...
    def stop(self, reason: str, *, fatal: RunAborted | None = None) -> None: ...
    def cancel(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LifecycleSettings:
    """How items are carried through (every field has a named default).

    ``retries``: new jobs per item after a transient FAILED (and requests per call:
    ``request_retry``). ``verify``: ``decode`` checks every image's pixels, ``structure``
    walks its container only, ``auto`` decodes while that takes at most ``decode_share`` of
    the run's time. ``webhook``: the webhook fields each new submit carries (None: none).
    """

    retries: int = 4
    request_retry: RetryPolicy = field(default_factory=RetryPolicy)
    job_timeout: float = 600.0
    max_download_bytes: int = 64 << 20
    verify: str = "auto"
    decode_share: float = 0.1
    webhook: WebhookRequest | None = None


@dataclass
class LifecycleStats:
    """What the lifecycles of a run counted (the pool reports them in summary.json)."""

    requests: Counter[str] = field(default_factory=Counter)  # by route
    checks: Counter[str] = field(default_factory=Counter)  # images by verification
    retries: int = 0
    resubmissions: int = 0  # new jobs after a transient FAILED
    attached: int = 0
    new: int = 0
    lost: int = 0
    not_started: int = 0
    decode_seconds: float = 0.0


class _ItemFailed(Exception):
    """The item ends failed with ``info`` (caught inside :class:`Lifecycle`)."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


class _NotStarted(Exception):
    """The run stopped before this item was submitted: it gets no result line (caught
    inside :class:`Lifecycle`)."""


@dataclass
class _Item:
    """One item on its way: where its lifecycle stands."""

    item: WorkItem
    started: float
    started_at: str
    submission: int = 0
    job_id: str | None = None
    attached: bool = False
    was_attached: bool = False
    resend: JournalIntent | None = None  # a journaled submit to send again, exactly
    refetch: bool = False
    replayed: bool = False
    first_sent_wall: float | None = None
    sent_before: bool = False  # first sent by an earlier run of this directory (journaled)
    submitted: float | None = None
    jobs_created: int = 0
    credit_cost: int | None = None
    polls: int = 0
    generating: float | None = None
    downloading: float | None = None
    job_token: int | None = None
    sightings: list[Sighting] = field(default_factory=list)  # the current job's answers

    def new_submission(self) -> None:
        self.submission += 1
        self.job_id = None
        self.attached = False
        self.resend = None


# --------------------------------------------------------------------------------------------
# The lifecycle


class Lifecycle:
    """Carries items through, one call of :meth:`process` each (many run at once).

    ``timings`` is what the completion source learned of job times (the lifecycle teaches it
    as jobs end); ``expected_job_seconds`` is a guess before any job ended.
    """

    def __init__(self, *, client: ApiClient, store: ItemStore, index: ResumeIndex,
                 gate: SubmitGate, budget: Budget, completion: CompletionSource,
                 timings: JobTimings, control: RunControl,
                 settings: LifecycleSettings | None = None,
                 stats: LifecycleStats | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
                 rng: random.Random | None = None) -> None:
        self.client, self.store, self.index = client, store, index
        self.gate, self.budget, self.completion = gate, budget, completion
        self.timings, self.control = timings, control
        self.settings = settings or LifecycleSettings()
        self.stats = stats or LifecycleStats()
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random()
        self.started = clock()
        self.lags: list[float] = []  # job end -> seen done, per job
        # Wall seconds from a job's completedAt to the start of its download, per job.
        self.download_delays: array[float] = array("d")
        self.uploads = _Uploads(self, index.uploads)
        self.fetcher = _Fetcher(self)

    async def process(self, item: WorkItem) -> Result | None:
        """The item's result, or None when the run stopped before its job was submitted."""
        current = _Item(item=item, started=self.clock(), started_at=utc_now())
        current.submission, current.job_id, current.resend = self.resume_point(item)
        current.refetch = self.index.missing_files(item.key) is not None
        if current.job_id is not None:
            current.attached = current.was_attached = True
            current.first_sent_wall = self.index.journaled_sent(item.key)
            current.sent_before = current.first_sent_wall is not None
            self.stats.attached += 1
        elif self.index.prior_failure(item.key) is None and not current.refetch \
                and self.index.journaled_intent(item.key) is None:
            self.stats.new += 1
        try:
            files = await self._run(current)
        except _NotStarted:
            self.stats.not_started += 1
            return None
        except _ItemFailed as exc:
            return self._result(current, error=exc.info, files=())
        except RunAborted as exc:
            # Run-fatal (refused key, unwritable output): stop everything now. No result
            # line: a submitted job stays in the journal for the next run.
            self.control.stop(str(exc), fatal=exc)
            self.control.cancel()
            self.stats.not_started += 1
            return None
        return self._result(current, error=None, files=files)

    def resume_point(self, item: WorkItem) -> tuple[int, str | None, JournalIntent | None]:
        """Where the item's lifecycle picks up: ``(submission number, job to re-attach or
        None, a journaled submit to resend exactly or None)`` (see the module doc)."""
        index = self.index
        prior = index.prior_failure(item.key) or index.missing_files(item.key)
        job = index.journaled_job(item.key)
        intent = index.journaled_intent(item.key)
        floor = prior.submission if prior is not None else 0
        if intent is not None and intent.submission >= floor and (
                job is None or intent.submission > job[0]):
            if _is_stale(intent):
                return intent.submission + 1, None, None
            return intent.submission, None, intent
        if job is not None and job[0] >= floor:
            if prior is None or prior.job_id != job[1] or prior.category in REATTACH_CATEGORIES:
                return job[0], job[1], None
            return job[0] + 1, None, None
        if prior is not None:
            if prior.job_id is None:
                # The submit may have created a job whose answer we never got: same key.
                return prior.submission, None, None
            if prior.category in REATTACH_CATEGORIES:
                # The job itself did not fail (we lost track of it, or its download did).
                return prior.submission, prior.job_id, None
            return prior.submission + 1, None, None
        return 0, None, None

    async def _run(self, current: _Item) -> tuple[FileRecord, ...]:
        max_jobs = self.settings.retries + 1
        while True:
            state = await self._one_job(current)
            if state is None:
                # A journaled job the API no longer knows: journal it as lost and pay anew,
                # with a new key (the old one may still replay the forgotten job).
                self.stats.lost += 1
                self.store.journal_lost(current.item, current.submission, current.job_id or "")
                if current.jobs_created >= max_jobs or self.control.stopping:
                    raise _ItemFailed(ErrorInfo(
                        ErrorCategory.LOST,
                        f"job {current.job_id} is no longer known to the API", True))
                current.new_submission()
                continue
            self._note_end(current, state)
            if state.status == "COMPLETED":
                if not state.expired:
                    self._note_download_start(current, state)
                    return await self.fetcher.fetch_all(current, state.images)
                if current.refetch and current.jobs_created < max_jobs \
                        and not self.control.stopping:
                    current.new_submission()  # deleted here and purged there: make it again
                    continue
                raise _ItemFailed(ErrorInfo(ErrorCategory.EXPIRED,
                                            "images expired before download", False))
            if state.status == "CANCELLED":
                raise _ItemFailed(ErrorInfo(ErrorCategory.CANCELLED, "job was cancelled", False))
            message = state.error or "job failed"
            transient = is_capacity_failure(message)
            info = ErrorInfo(ErrorCategory.GENERATION_FAILED, message, transient)
            if not transient or current.jobs_created >= max_jobs or self.control.stopping:
                raise _ItemFailed(info)
            # No capacity: a new job (credits were refunded), with a new Idempotency-Key.
            self.stats.resubmissions += 1
            await self.sleep(self.settings.request_retry.backoff(current.jobs_created, self.rng))
            current.new_submission()

    async def _one_job(self, current: _Item) -> JobLike | None:
        """Submit (unless re-attaching) and wait, holding an in-flight slot throughout."""
        if current.job_id is None:
            if self.control.stopping:
                raise _NotStarted
            body, inputs, webhook = await self._body(current.item, current.resend)
            async with self.gate.inflight:
                await self._submit(current, body, inputs, webhook)
                return await self._wait(current)
        async with self.gate.inflight:
            return await self._wait(current)

    async def _body(self, item: WorkItem, resend: JournalIntent | None
                    ) -> tuple[dict[str, Any], tuple[str, ...] | None, WebhookRequest | None]:
        """The submit body, the ``input_images`` URLs and the webhook fields it carries.
        ``resend`` (from the journal) sends exactly what an earlier submit carried: its
        uploads' URLs, and its webhook fields (or none), whatever this run's are."""
        params = dict(item.params)
        refs = params.get("input_images")
        webhook = resend.webhook if resend is not None else self.settings.webhook
        body: dict[str, Any] = {"prompt": item.prompt, "model": item.model,
                                "fluxParams": params}
        if webhook is not None:
            body.update(webhook.body_fields())
        inputs = resend.inputs if resend is not None else None
        if not refs:
            return body, None, webhook
        if inputs is None or len(inputs) != len(refs):
            try:
                inputs = tuple([ref if is_remote_ref(ref) else await self.uploads.url_for(ref)
                                for ref in refs])
            except ApiError as exc:
                raise _ItemFailed(_error_info(exc)) from exc
            except OSError as exc:
                raise _ItemFailed(ErrorInfo(
                    ErrorCategory.INVALID_REQUEST,
                    f"cannot read a reference image: {exc.strerror or exc}", False)) from exc
        params["input_images"] = list(inputs)
        return body, inputs, webhook

    async def _submit(self, current: _Item, body: dict[str, Any],
                      inputs: tuple[str, ...] | None, webhook: WebhookRequest | None) -> None:
        item = current.item
        if self.control.stopping:
            raise _NotStarted
        if not self.budget.reserve():
            self.control.stop(f"budget of {self.budget.limit:g} credits reached")
            raise _NotStarted
        key = item.idempotency_key(current.submission)
        try:
            await self.gate.throttle()
            if self.control.stopping:
                raise _NotStarted
            if current.first_sent_wall is None:
                # A resend's first send was the journaled one (an earlier run of this directory).
                resent = current.resend.at if current.resend is not None else None
                current.sent_before = resent is not None
                current.first_sent_wall = resent if resent is not None else time.time()
            self.store.journal_intent(item, current.submission, inputs, webhook)
            current.resend = JournalIntent(current.submission, inputs, webhook=webhook)
            accepted = await self.call(
                "submit", lambda: self.client.submit(body, idempotency_key=key),
                throttle=True)
        except ApiError as exc:
            self.budget.release()
            raise _ItemFailed(_error_info(exc)) from exc
        except BaseException:
            self.budget.release()
            raise
        # A replay answers with a job that may be past QUEUED; one still QUEUED is told apart
        # by its creation time once we see it (see _note_end).
        current.replayed = bool(getattr(accepted, "replayed", False)) \
            or accepted.status != "QUEUED"
        current.job_id = accepted.job_id
        current.jobs_created += 1
        current.submitted = self.clock()
        current.job_token = self.gate.accepted()
        self.store.journal_job(item, current.submission, accepted.job_id)

    async def _wait(self, current: _Item) -> JobLike | None:
        """Wait for the job's end through the completion source."""
        assert current.job_id is not None
        submitted = current.submitted if current.submitted is not None else self.clock()
        waiting = Waiting(current.job_id, submitted=submitted,
                          deadline=submitted + self.settings.job_timeout,
                          attached=current.attached)
        self.gate.jobs_open += 1
        state: JobLike | None = None
        try:
            state = await self.completion.wait(waiting)
        except ApiError as exc:
            raise _ItemFailed(_error_info(exc)) from exc
        finally:
            self.gate.jobs_open -= 1
            current.polls += len(waiting.sightings)
            current.sightings = waiting.sightings
            if current.job_token is not None:
                duration = None if state is None else _job_seconds(state)
                end = None if duration is None else submitted + duration
                if end is None and state is not None:
                    end = _end_from_completed(state, now=self.clock(), since=submitted)
                self.gate.ended(current.job_token, end)
                current.job_token = None
        return state

    def _note_download_start(self, current: _Item, state: JobLike) -> None:
        """How long after the job's end (the API's ``completedAt``) its download starts, for
        jobs this run submitted (on the wall clock: on loopback, the simulator's clock)."""
        completed = parse_time(state.completed_at)
        if completed is not None and current.submitted is not None \
                and not current.was_attached:
            self.download_delays.append(time.time() - completed)

    def _note_end(self, current: _Item, state: JobLike) -> None:
        """Learn from a job's end (its timings), and settle what it cost this run."""
        if current.submitted is not None:
            current.generating = self.clock() - current.submitted
            if state.status == "COMPLETED":
                # The server's own timestamps give the job's true duration; what we saw also
                # holds our polling lag, which would make the estimate drift with the schedule.
                reported = _job_seconds(state)
                self.timings.observe(current.generating if reported is None else reported,
                                     () if current.was_attached else current.sightings)
                if reported is not None and not current.was_attached:
                    self.lags.append(max(0.0, current.generating - reported))
        if state.status == "COMPLETED":
            self.gate.inflight.on_success()
        created = parse_time(state.created_at)
        if created is not None and current.first_sent_wall is not None \
                and created < current.first_sent_wall - REPLAY_SLACK:
            current.replayed = True  # created before this directory first asked: not ours
        elif current.sent_before and created is not None:
            # A re-attached job, or a resend the API answered with the job an earlier run's
            # send created: this directory paid for it, and this run records it.
            current.replayed = False
        elif current.attached:
            current.replayed = True
        current.credit_cost = state.credit_cost or 0
        if current.submitted is not None:
            self.budget.settle(0.0 if current.replayed else float(current.credit_cost))

    async def call(self, route: str, make: Callable[[], Awaitable[T]], *,
                   throttle: bool = False, deadline: float | None = None) -> T:
        """One API request with the run's pauses, throttle and retries (see
        :func:`~batchflux.retry.call_with_retries`)."""
        gate = self.gate

        async def before(attempt: int) -> None:
            if throttle and attempt > 0:
                await gate.throttle()
            await gate.pause.wait()
            self.stats.requests[route] += 1

        def on_error(exc: ApiError, sent_at: float) -> None:
            self._on_api_error(exc, submit=route == "submit", sent_at=sent_at)

        def on_retry() -> None:
            self.stats.retries += 1

        return await call_with_retries(make, policy=self.settings.request_retry,
                                       sleep=self.sleep, clock=self.clock, rng=self.rng,
                                       before_attempt=before, on_error=on_error,
                                       on_retry=on_retry, deadline=deadline)

    async def fetch_job(self, job_id: str, deadline: float) -> JobLike:
        """``GET /v2/jobs/{id}`` once, with retries: what polling asks of the lifecycle."""
        return await self.call("poll", lambda: self.client.get_job(job_id), deadline=deadline)

    def _on_api_error(self, exc: ApiError, *, submit: bool, sent_at: float) -> None:
        if exc.category is ErrorCategory.RATE_LIMITED:
            self.gate.rate_limited(submit=submit, retry_after=exc.retry_after, sent_at=sent_at)
        elif exc.category is ErrorCategory.AUTH:
            fatal = RunAborted(f"the API refused the key: {exc.message}",
                               category=ErrorCategory.AUTH, exit_code=EXIT_ITEMS_FAILED)
            self.control.stop("the API key was refused", fatal=fatal)
            raise fatal from exc
        elif exc.category is ErrorCategory.INSUFFICIENT_CREDITS:
            fatal = RunAborted(f"out of credits: {exc.message}",
                               category=ErrorCategory.INSUFFICIENT_CREDITS,
                               exit_code=EXIT_ITEMS_FAILED)
            self.control.stop("out of credits (402)", fatal=fatal)
            raise _NotStarted from exc

    def _result(self, current: _Item, *, error: ErrorInfo | None,
                files: tuple[FileRecord, ...]) -> Result:
        item = current.item
        return Result(
            key=item.key, index=item.index, prompt_id=item.prompt_id,
            status="failed" if error is not None else "ok", model=item.model,
            prompt=item.prompt, seed=item.seed, params=_jsonable_params(item.params),
            template=item.template, vars=dict(item.vars), job_id=current.job_id,
            submission=current.submission,
            jobs=current.jobs_created + (1 if current.was_attached else 0),
            polls=current.polls, credit_cost=current.credit_cost, replayed=current.replayed,
            error=error, files=files,
            timings=Timings(rounded(current.generating), rounded(current.downloading),
                            rounded(self.clock() - current.started)),
            started_at=current.started_at, finished_at=utc_now(), source=item.source,
            meta=dict(item.meta), reroll_of=item.reroll_of, attempt=item.attempt)


# --------------------------------------------------------------------------------------------
# Reference images and result images


class _Uploads:
    """Local reference images: uploaded once per content, reused after; an earlier run's
    uploads are reused while the API still keeps them."""

    def __init__(self, lifecycle: Lifecycle, journaled: Mapping[str, JournalUpload]) -> None:
        self._life = lifecycle
        self._urls: dict[str, str] = {digest: upload.url for digest, upload in journaled.items()
                                      if _seconds_until(upload.expires_at) > UPLOAD_MARGIN}
        self._digests: dict[str, str] = {}
        self._locks: dict[str, anyio.Lock] = {}

    async def url_for(self, path: str) -> str:
        """The URL to send for the local file ``path`` (uploading it when needed)."""
        life = self._life
        async with self._locks.setdefault(path, anyio.Lock()):
            digest = self._digests.get(path)
            if digest is not None and digest in self._urls:
                return self._urls[digest]
            data = await anyio.Path(path).read_bytes()
            digest = self._digests[path] = hashlib.sha256(data).hexdigest()
            url = self._urls.get(digest)
            if url is None:
                result = await life.call("upload", lambda: life.client.upload(
                    data, filename=Path(path).name))
                url = self._urls[digest] = result.url
                life.store.journal_upload(digest, url, getattr(result, "expires_at", None))
            return url


class _Fetcher:
    """Result images: downloaded to a temp file, verified, renamed into place."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._life = lifecycle
        self._input_sizes: dict[str, tuple[int, int] | None] = {}

    async def fetch_all(self, current: _Item, urls: Sequence[str]) -> tuple[FileRecord, ...]:
        """Every image of a COMPLETED job, in order."""
        if not urls:
            raise _ItemFailed(ErrorInfo(ErrorCategory.DOWNLOAD_FAILED,
                                        "job completed without images", False))
        begin = self._life.clock()
        files = []
        for number, url in enumerate(urls, start=1):
            files.append(await self._fetch_one(current.item, url, number))
        current.downloading = self._life.clock() - begin
        return tuple(files)

    async def _fetch_one(self, item: WorkItem, url: str, number: int) -> FileRecord:
        try:
            return await self._life.call("download",
                                         lambda: self._download(item, url, number))
        except ApiError as exc:
            category = exc.category if exc.category in (ErrorCategory.EXPIRED,
                                                        ErrorCategory.AUTH) \
                else ErrorCategory.DOWNLOAD_FAILED
            raise _ItemFailed(ErrorInfo(category, exc.message, exc.retryable,
                                        exc.http_status)) from exc

    async def _download(self, item: WorkItem, url: str, number: int) -> FileRecord:
        """One attempt: stream, verify, rename. An image that does not verify is a
        retryable ``download_failed`` (fetched again)."""
        life = self._life
        async with life.store.temp_image(item, number) as temp:
            await life.client.download(url, temp,
                                       max_bytes=life.settings.max_download_bytes)
        try:
            facts = inspect_container(temp.path)
            check = "structure"
            if self._should_decode():
                began = time.perf_counter()
                facts = await anyio.to_thread.run_sync(inspect_image, temp.path)
                life.stats.decode_seconds += time.perf_counter() - began
                check = "decode"
            check_expected(facts, item.params, input_size=await self._input_size(item))
            life.stats.checks[check] += 1
            return await life.store.commit_image(
                temp, item, ext=facts.format, number=number, width=facts.width,
                height=facts.height, fmt=facts.format, check=check)
        except ImageCheckError as exc:
            raise ApiError(str(exc), category=ErrorCategory.DOWNLOAD_FAILED,
                           retryable=True) from exc
        finally:
            if temp.path.exists():
                temp.path.unlink(missing_ok=True)

    def _should_decode(self) -> bool:
        life = self._life
        mode = life.settings.verify
        if mode != "auto":
            return mode == "decode"
        elapsed = max(1.0, life.clock() - life.started)
        return life.stats.decode_seconds <= life.settings.decode_share * elapsed

    async def _input_size(self, item: WorkItem) -> tuple[int, int] | None:
        if item.params.get("aspect_ratio") != "match_input_image":
            return None
        refs = item.params.get("input_images") or ()
        if not refs or is_remote_ref(refs[0]):
            return None
        path = refs[0]
        if path not in self._input_sizes:
            self._input_sizes[path] = await anyio.to_thread.run_sync(image_size, Path(path))
        return self._input_sizes[path]


# --------------------------------------------------------------------------------------------
# Small pure helpers


def is_capacity_failure(message: str | None) -> bool:
    """True for a FAILED job's error that says "try again" (no capacity), not a refusal."""
    text = (message or "").lower()
    return any(marker in text for marker in CAPACITY_MARKERS) and "policy" not in text


def _jsonable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(params)
    refs = out.get("input_images")
    if refs:
        out["input_images"] = [ref if is_remote_ref(ref) else Path(ref).name for ref in refs]
    return out


def _job_seconds(state: JobLike) -> float | None:
    """Seconds from ``createdAt`` to ``completedAt`` as the API reports them, if it does."""
    created, completed = parse_time(state.created_at), parse_time(state.completed_at)
    if created is None or completed is None:
        return None
    return completed - created


def _end_from_completed(state: JobLike, *, now: float, since: float) -> float | None:
    """When the job ended on our clock, from ``completedAt`` alone (a webhook carries no
    ``createdAt``): None when that time is unknown or not between ``since`` and ``now``."""
    completed = parse_time(state.completed_at)
    if completed is None:
        return None
    end = now - (time.time() - completed)
    return end if since <= end <= now else None


def _seconds_until(text: str | None) -> float:
    """Seconds from now until an ISO 8601 time (0 when unknown: assume it is gone)."""
    when = parse_time(text)
    return 0.0 if when is None else when - time.time()


def _is_stale(intent: JournalIntent) -> bool:
    return intent.at is not None and time.time() - intent.at > IDEMPOTENCY_WINDOW


def _error_info(exc: ApiError) -> ErrorInfo:
    return ErrorInfo(exc.category, exc.message, exc.retryable, exc.http_status)
