"""run_batch(): every item submitted, polled, downloaded, verified and recorded.

Shape (DESIGN.md section 5)::

    feeder --(0-buffer stream)--> N workers --(stream)--> one writer
                                   |  shared: submit TokenBucket, Cooldown (429 pauses all),
                                   |          AdaptiveLimit (in-flight cap, AIMD on 429)
                                   `- per item: throttle -> journal intent -> submit ->
                                      journal jobId -> poll -> download -> verify -> rename

Per-item failures are data (a result line with an error category). Run-fatal conditions
(401/403, 402, budget, unwritable output) stop submitting; what is in flight is journaled and
the next run re-attaches to it. The runner sees the API client, the store and the reporter
through the Protocols below; ``cli`` wires the concrete ones.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .errors import EXIT_ITEMS_FAILED, ApiError, RunAborted
from .imagecheck import (
    ImageCheckError,
    check_expected,
    image_size,
    inspect_container,
    inspect_image,
)
from .limits import AdaptiveLimit, CapDetector, Cooldown, SubmitRateLearner, TokenBucket
from .models import ErrorCategory, ErrorInfo, WorkItem, is_remote_ref
from .retry import (
    TERMINAL_STATUSES,
    JobTimings,
    PollPolicy,
    RetryPolicy,
    Sighting,
    next_poll_delay,
)
from .store import JournalIntent, ResumeIndex, RunStore, StoredFile, key_id

CAPACITY_MARKERS = ("no available capacity", "capacity", "try again", "retry shortly")

_RETRYABLE_NAMES = frozenset(c.value for c in ErrorCategory if c.retryable)

#: Failures that left a job which may still be good: a retry re-attaches to it first.
REATTACH_CATEGORIES = frozenset(
    c.value for c in (ErrorCategory.TIMEOUT, ErrorCategory.NETWORK, ErrorCategory.SERVER_ERROR,
                      ErrorCategory.RATE_LIMITED, ErrorCategory.DOWNLOAD_FAILED)
)


# --------------------------------------------------------------------------------------------
# Seams


class JobLike(Protocol):
    """What the runner reads of a job (``apiframe.JobState`` is one)."""

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


class ApiClient(Protocol):
    async def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None) -> Any: ...
    async def get_job(self, job_id: str) -> JobLike: ...
    async def download(self, url: str, sink: Any, *, max_bytes: int = ...) -> Any: ...
    async def upload(self, data: bytes, *, filename: str) -> Any: ...


class Reporter(Protocol):
    def start(self, *, total: int | None, skipped: int, attached: int) -> None: ...
    def result(self, record: Mapping[str, Any]) -> None: ...
    def status(self, state: RunState) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, summary: Mapping[str, Any]) -> None: ...


class NullReporter:
    def start(self, *, total: int | None, skipped: int, attached: int) -> None:
        pass

    def result(self, record: Mapping[str, Any]) -> None:
        pass

    def status(self, state: RunState) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def finish(self, summary: Mapping[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Settings and state


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How a run behaves. Every field has a named default; build with keywords."""

    #: Jobs in flight (submitted, not yet finished): the ceiling of the adaptive cap, and
    #: what ``-j`` sets. Workers, connections and buffers follow from it.
    max_inflight: int = 32
    #: Where slow start begins (None: :func:`initial_inflight`).
    initial_inflight: int | None = None
    #: Workers (each carries one item from submit to its result line); None: the jobs in
    #: flight plus room for the downloads of jobs that just finished.
    concurrency: int | None = None
    submits_per_second: float | None = None
    retries: int = 4  # new jobs per item after the first (transient FAILED), and per request
    request_retry: RetryPolicy = field(default_factory=RetryPolicy)
    poll: PollPolicy = field(default_factory=PollPolicy)
    job_timeout: float = 600.0
    budget: float | None = None
    cost_per_image: float = 2.0
    retry_failed: str | None = None  # None | "retryable" | "all"
    max_download_bytes: int = 64 << 20
    expected_job_seconds: float | None = None
    seed: int | None = None  # for jitter; None: from the OS
    #: How a downloaded image is verified before it is renamed into place. Every image's
    #: container is walked end to end (:func:`batchflux.imagecheck.inspect_container`:
    #: truncated, padded or spliced bodies fail). "decode" also decodes every pixel with
    #: Pillow (~15-20 ms of CPU a megapixel for WebP, mostly holding the GIL); "structure"
    #: never does; "auto" decodes every image while decoding takes at most
    #: ``decode_share`` of the run's time (always, at the rates a real API allows), and walks
    #: the structure only beyond that, so that verification never becomes the bottleneck.
    #: Each file's result line says which check it passed.
    verify: str = "auto"
    decode_share: float = 0.1


@dataclass
class RunState:
    """Live numbers for the progress display (read-only for reporters)."""

    total: int | None = None
    done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    inflight: int = 0
    inflight_cap: int = 0
    cooldown_remaining: float = 0.0
    credits_spent: float = 0.0
    started: float = 0.0
    stop_reason: str | None = None


@dataclass
class _Stats:
    by_status: Counter[str] = field(default_factory=Counter)
    by_category: Counter[str] = field(default_factory=Counter)
    latencies: array = field(default_factory=lambda: array("d"))
    lags: array = field(default_factory=lambda: array("d"))  # job end -> seen done
    requests: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)  # images by verification
    retries: int = 0
    submit_429: int = 0  # submits answered 429
    resubmissions: int = 0
    attached: int = 0
    new: int = 0
    retried_items: int = 0
    refetched: int = 0  # ok items whose images were gone: fetched again
    duplicates: int = 0  # items with an earlier item's key: generated once, recorded twice
    replayed: int = 0  # jobs the API replayed (created before this run asked): not paid now
    lost: int = 0  # journaled jobs the provider no longer knew: submitted anew
    skipped_ok: int = 0
    skipped_failed: int = 0
    skipped_failed_retryable: int = 0
    not_started: int = 0
    credits: float = 0.0
    images: int = 0
    bytes: int = 0


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def percentile(values: Iterable[float], q: float) -> float | None:
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def is_capacity_failure(message: str | None) -> bool:
    text = (message or "").lower()
    return any(marker in text for marker in CAPACITY_MARKERS) and "policy" not in text


#: A journaled submit older than this is not resent with its old key: the API keeps
#: idempotency keys for 24 h, and the old body's upload URLs are long gone.
IDEMPOTENCY_WINDOW = 23 * 3600.0
#: Upload URLs this close to expiry are not used for a new job (the API must still fetch them).
UPLOAD_MARGIN = 15 * 60.0
#: A job created this long before we first asked for it was created by someone else (an
#: earlier run, another directory): the API replayed it and this run did not pay for it.
REPLAY_SLACK = 2.0


#: The in-flight cap's first value is half of ``-j`` (at least this many, or all of ``-j``
#: when it is smaller): moderate, so that a provider with a low cap meets few 429s, and one
#: job round trip of slow start (which doubles it) from the ceiling.
SLOW_START_INITIAL = 16


def initial_inflight(max_inflight: int) -> int:
    """Where slow start begins for a ceiling of ``max_inflight`` jobs in flight."""
    return max(min(max_inflight, SLOW_START_INITIAL), max_inflight // 2)


def workers_for(settings: RunSettings) -> int:
    """Workers for a run: one per job in flight, plus room for the downloads (and result
    lines) of jobs that just finished, so that downloads never hold a job slot idle."""
    if settings.concurrency is not None:
        return max(1, settings.concurrency)
    return settings.max_inflight + max(4, settings.max_inflight // 4)


def skip_reason(index: ResumeIndex, key: str, retry_failed: str | None) -> str | None:
    """Why an item is not run again: ``"ok"`` (done), ``"failed"`` (an earlier failure that
    ``retry_failed`` does not retry), or None (run it: new, retried, or images to fetch)."""
    if index.is_ok(key):
        return "ok"
    prior = index.prior_failure(key)
    if prior is not None and (retry_failed is None or (
            retry_failed == "retryable" and not prior.retryable)):
        return "failed"
    return None


@dataclass(frozen=True, slots=True)
class Scan:
    """One pass over a run's items before anything is spent: how many there are, how many
    are still to run (each distinct request once), and which keys repeat."""

    total: int
    to_run: int
    duplicates: frozenset[int]  # key ids that more than one item has


def scan_items(items: Iterable[WorkItem], index: ResumeIndex, *,
               retry_failed: str | None = None) -> Scan:
    """Count the items and find repeated keys in bounded memory (8 bytes an item to run)."""
    total = 0
    pending = array("Q")
    for item in items:
        total += 1
        if skip_reason(index, item.key, retry_failed) is None:
            pending.append(key_id(item.key))
    ordered = sorted(pending)
    repeated = {a for a, b in zip(ordered, ordered[1:]) if a == b}
    return Scan(total=total, to_run=len(ordered) - sum(
        1 for a, b in zip(ordered, ordered[1:]) if a == b), duplicates=frozenset(repeated))


@dataclass
class _KeyGroup:
    """The items of one run that share a key: the first runs, the others wait for its record."""

    first_index: int
    record: dict[str, Any] | None = None
    pending: list[WorkItem] = field(default_factory=list)


def duplicate_record(item: WorkItem, original: Mapping[str, Any]) -> dict[str, Any]:
    """The result line of ``item``, whose request is the same as ``original``'s item: it was
    generated once, for the first; this line points at the same files."""
    now = utc_now()
    record = dict(original)
    record.update({
        "index": item.index,
        "prompt_id": item.prompt_id,
        "template": item.template,
        "vars": dict(item.vars),
        "duplicate_of": original["index"],
        "jobs": 0,
        "polls": 0,
        "replayed": False,
        "timings": {"generating": None, "downloading": None, "total": 0.0},
        "started_at": now,
        "finished_at": now,
        "source": item.source,
        "meta": dict(item.meta),
    })
    return record


class _ItemFailed(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


class _NotStarted(Exception):
    """The run stopped before this item was submitted: it gets no result line."""


# --------------------------------------------------------------------------------------------
# The runner


class Runner:
    def __init__(
        self,
        *,
        client: ApiClient,
        store: RunStore,
        index: ResumeIndex,
        settings: RunSettings,
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.client = client
        self.store = store
        self.index = index
        self.settings = settings
        self.reporter = reporter or NullReporter()
        self.clock = clock
        self.sleep = sleep
        self.rng = random.Random(settings.seed)
        self.bucket = TokenBucket(settings.submits_per_second, clock=clock, sleep=sleep)
        self.cooldown = Cooldown(clock=clock, sleep=sleep)
        # A 429 on a submit pauses submits only: polls and downloads are what free the
        # provider's capacity, and holding them back would waste it.
        self.submit_cooldown = Cooldown(clock=clock, sleep=sleep)
        self.submit_rate = SubmitRateLearner(self.bucket, clock=clock)
        initial = settings.initial_inflight or initial_inflight(settings.max_inflight)
        self.inflight = AdaptiveLimit(initial, maximum=settings.max_inflight, clock=clock,
                                      slow_start=initial < settings.max_inflight)
        self._jobs_open = 0  # jobs accepted (or re-attached) and not yet seen finished
        self.caps = CapDetector()
        self._job_tokens = itertools.count()
        self.timings = JobTimings()
        self.state = RunState(inflight_cap=settings.max_inflight)
        self.stats = _Stats()
        self._fatal: RunAborted | None = None
        # Reference images by content sha256 -> URL: an earlier run's uploads are reused while
        # the API still keeps them; a resend of a journaled submit uses the journal's URLs.
        self._uploads: dict[str, str] = {
            digest: upload.url for digest, upload in index.uploads.items()
            if _seconds_until(upload.expires_at) > UPLOAD_MARGIN}
        self._path_digests: dict[str, str] = {}
        self._upload_locks: dict[str, anyio.Lock] = {}
        self._input_sizes: dict[str, tuple[int, int] | None] = {}
        self._committed_credits = 0.0
        self._decode_seconds = 0.0
        self._duplicate_ids: frozenset[int] = frozenset()
        self._groups: dict[int, _KeyGroup] = {}
        self._work_scope: anyio.CancelScope | None = None

    # -- stopping --------------------------------------------------------------------------

    def stop(self, reason: str, *, fatal: RunAborted | None = None) -> None:
        """Stop submitting new jobs. In-flight jobs finish (they are paid for)."""
        if self.state.stop_reason is None:
            self.state.stop_reason = reason
            self.reporter.message(f"stopping: {reason}")
        if fatal is not None and self._fatal is None:
            self._fatal = fatal

    @property
    def stopping(self) -> bool:
        return self.state.stop_reason is not None

    # -- the pool ----------------------------------------------------------------------------

    async def run(self, items: Iterable[WorkItem], *, total: int | None = None,
                  duplicates: frozenset[int] = frozenset(),
                  summary_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run every item; return the summary (also written to summary.json, once, with
        ``summary_extra`` merged in).

        ``duplicates`` are the key ids (:func:`batchflux.store.key_id`) that more than one
        item has (:func:`scan_items` finds them): the first item of each runs, the others are
        recorded as its duplicates once it ends, without a job of their own.
        """
        self.state.started = self.clock()
        self.state.total = total
        self._duplicate_ids = duplicates
        started_at = utc_now()
        send, receive = anyio.create_memory_object_stream[WorkItem](0)
        results_send, results_receive = anyio.create_memory_object_stream[dict[str, Any]](64)
        self.reporter.start(total=total, skipped=0, attached=len(self.index.jobs))
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._ticker)
                async with anyio.create_task_group() as tg:
                    self._work_scope = tg.cancel_scope
                    tg.start_soon(self._feeder, items, send, results_send.clone())
                    async with results_send:
                        for _ in range(workers_for(self.settings)):
                            tg.start_soon(self._worker, receive.clone(), results_send.clone())
                    receive.close()
                    tg.start_soon(self._writer, results_receive)
                outer.cancel_scope.cancel()
        finally:
            summary = {**self._summary(started_at), **(summary_extra or {})}
            try:
                self.store.write_summary(summary)
            except OSError as exc:
                self.reporter.message(f"could not write summary.json: {exc.strerror or exc}")
            self.reporter.finish(summary)
        if self._fatal is not None:
            self._fatal.summary = summary  # type: ignore[attr-defined]
            raise self._fatal
        return summary

    async def _feeder(self, items: Iterable[WorkItem], send: ObjectSendStream[WorkItem],
                      results: ObjectSendStream[dict[str, Any]]) -> None:
        retry_failed = self.settings.retry_failed
        stats = self.stats
        async with send, results:
            for item in items:
                if self.stopping:
                    break
                kid = key_id(item.key)
                group = self._groups.get(kid) if self._duplicate_ids else None
                if group is not None:
                    # The same request as an earlier item of this run: generated once.
                    stats.duplicates += 1
                    if group.record is None:
                        group.pending.append(item)
                    else:
                        await results.send(duplicate_record(item, group.record))
                    continue
                reason = skip_reason(self.index, item.key, retry_failed)
                if reason is not None:
                    self._skip()
                    if reason == "ok":
                        stats.skipped_ok += 1
                    else:
                        stats.skipped_failed += 1
                        prior = self.index.prior_failure(item.key)
                        stats.skipped_failed_retryable += bool(prior and prior.retryable)
                    continue
                if self.index.prior_failure(item.key) is not None:
                    stats.retried_items += 1
                elif self.index.missing_files(item.key) is not None:
                    stats.refetched += 1
                if kid in self._duplicate_ids:
                    self._groups[kid] = _KeyGroup(first_index=item.index)
                await send.send(item)

    def _skip(self) -> None:
        self.state.skipped += 1

    async def _worker(self, receive: ObjectReceiveStream[WorkItem],
                      results: ObjectSendStream[dict[str, Any]]) -> None:
        async with receive, results:
            async for item in receive:
                record = await self._process(item)
                if record is not None:
                    await results.send(record)

    async def _writer(self, receive: ObjectReceiveStream[dict[str, Any]]) -> None:
        async with receive:
            async for record in receive:
                for line in self._with_duplicates(record):
                    try:
                        self.store.append_result(line)
                    except RunAborted as exc:
                        # Nothing more can be recorded: stop everything. Jobs in flight stay
                        # in the journal and the next run re-attaches to them.
                        self.stop(str(exc), fatal=exc)
                        self.cancel()
                        return
                    self._account(line)
                    self.reporter.result(line)

    def _with_duplicates(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """``record`` and the lines of the items that wait for it (same key, later index)."""
        if record.get("duplicate_of") is not None or not self._duplicate_ids:
            return [record]
        group = self._groups.get(key_id(record["key"]))
        if group is None or group.first_index != record["index"]:
            return [record]
        group.record = record
        pending, group.pending = group.pending, []
        return [record, *(duplicate_record(item, record) for item in pending)]

    def cancel(self) -> None:
        """Stop at once: no new submits, in-flight work abandoned (it stays journaled)."""
        if self._work_scope is not None:
            self._work_scope.cancel()

    async def _ticker(self) -> None:
        last_sync = self.clock()
        while True:
            await anyio.sleep(0.5)
            self.state.inflight = self._jobs_open
            self.state.inflight_cap = self.inflight.limit
            self.state.cooldown_remaining = max(self.cooldown.remaining,
                                                self.submit_cooldown.remaining)
            self.reporter.status(self.state)
            if self.clock() - last_sync >= 2.0:
                last_sync = self.clock()
                await anyio.to_thread.run_sync(self.store.sync)

    # -- one item ----------------------------------------------------------------------------

    async def _process(self, item: WorkItem) -> dict[str, Any] | None:
        started = self.clock()
        started_at = utc_now()
        ctx = _ItemContext(item=item, started=started, started_at=started_at)
        ctx.submission, ctx.job_id, ctx.resend_inputs = self._resume_point(item)
        ctx.refetch = self.index.missing_files(item.key) is not None
        if ctx.job_id is not None:
            ctx.attached = True
            self.stats.attached += 1
        elif self.index.prior_failure(item.key) is None and not ctx.refetch \
                and self.index.journaled_intent(item.key) is None:
            self.stats.new += 1
        ctx.was_attached = ctx.attached
        try:
            files = await self._run_item(ctx)
        except _NotStarted:
            self.stats.not_started += 1
            return None
        except _ItemFailed as exc:
            return self._record(ctx, status="failed", error=exc.info, files=())
        except RunAborted as exc:
            # Run-fatal (refused key, unwritable output): stop everything now. No result
            # line: a submitted job stays in the journal for the next run.
            self.stop(str(exc), fatal=exc)
            self.stats.not_started += 1
            self.cancel()
            return None
        return self._record(ctx, status="ok", error=None, files=files)

    def _resume_point(self, item: WorkItem) -> tuple[int, str | None, tuple[str, ...] | None]:
        """Where this item's lifecycle picks up: ``(submission number, job to re-attach or
        None, input URLs of a submit to resend or None)``.

        The rule is *never pay twice*: a job the journal or an earlier result knows is polled,
        not paid for again; a submit that may have created a job we never heard of is resent
        with the same Idempotency-Key and the same body (the API answers with that job); only
        a job that ended for good (FAILED, expired, cancelled) earns a new submission number.
        """
        index = self.index
        prior = index.prior_failure(item.key) or index.missing_files(item.key)
        job = index.journaled_job(item.key)
        intent = index.journaled_intent(item.key)
        floor = prior.submission if prior is not None else 0
        if intent is not None and intent.submission >= floor and (
                job is None or intent.submission > job[0]):
            if _is_stale(intent):
                return intent.submission + 1, None, None
            return intent.submission, None, intent.inputs
        if job is not None and job[0] >= floor:
            if prior is None or prior.job_id != job[1] or prior.category in REATTACH_CATEGORIES:
                return job[0], job[1], None
            return job[0] + 1, None, None
        if prior is not None:
            if prior.job_id is None:
                # The submit may have created a job whose answer we never got: same key.
                return prior.submission, None, None
            if prior.category in REATTACH_CATEGORIES:
                # The job itself did not fail (we lost track of it, or its download did):
                # look at it again before paying for a new one.
                return prior.submission, prior.job_id, None
            return prior.submission + 1, None, None
        return 0, None, None

    async def _run_item(self, ctx: _ItemContext) -> tuple[StoredFile, ...]:
        item = ctx.item
        max_submissions = self.settings.retries + 1
        while True:
            if ctx.job_id is None:
                if self.stopping:
                    raise _NotStarted
                body, inputs = await self._request_body_or_fail(item, ctx.resend_inputs)
                async with self.inflight:
                    await self._submit(ctx, body, inputs)
                    state = await self._wait(ctx)
            else:
                async with self.inflight:
                    state = await self._wait(ctx)
            if state is None:
                # A journaled job the provider no longer knows (it forgets jobs after about
                # 24 h; a restarted simulator at once): journal it as lost and pay anew, with
                # a new key (the old one may still replay the forgotten job).
                self.stats.lost += 1
                self.store.journal_lost(item, ctx.submission, ctx.job_id or "")
                if ctx.jobs_created >= max_submissions or self.stopping:
                    raise _ItemFailed(ErrorInfo(
                        ErrorCategory.LOST, f"job {ctx.job_id} is no longer known to the API",
                        True))
                self._new_submission(ctx)
                continue
            self._note_job(ctx, state)
            if state.status == "COMPLETED":
                if state.expired:
                    if ctx.refetch and ctx.jobs_created < max_submissions and not self.stopping:
                        # The images were deleted here and purged there: make them again.
                        self._new_submission(ctx)
                        continue
                    raise _ItemFailed(ErrorInfo(ErrorCategory.EXPIRED,
                                                "images expired before download", False))
                return await self._download_all(ctx, state)
            if state.status == "CANCELLED":
                raise _ItemFailed(ErrorInfo(ErrorCategory.CANCELLED, "job was cancelled", False))
            # FAILED
            message = state.error or "job failed"
            transient = is_capacity_failure(message)
            info = ErrorInfo(ErrorCategory.GENERATION_FAILED, message, transient)
            if not transient or ctx.jobs_created >= max_submissions or self.stopping:
                raise _ItemFailed(info)
            # A transient failure (no capacity): a new job, with a new Idempotency-Key.
            self.stats.resubmissions += 1
            await self.sleep(self.settings.request_retry.backoff(ctx.jobs_created, self.rng))
            self._new_submission(ctx)

    @staticmethod
    def _new_submission(ctx: _ItemContext) -> None:
        ctx.submission += 1
        ctx.job_id = None
        ctx.attached = False
        ctx.resend_inputs = None

    async def _request_body_or_fail(
            self, item: WorkItem, inputs: tuple[str, ...] | None,
    ) -> tuple[dict[str, Any], tuple[str, ...] | None]:
        try:
            return await self._request_body(item, inputs)
        except ApiError as exc:
            raise _ItemFailed(_error_info(exc)) from exc
        except OSError as exc:
            raise _ItemFailed(ErrorInfo(
                ErrorCategory.INVALID_REQUEST,
                f"cannot read a reference image: {exc.strerror or exc}", False)) from exc

    async def _request_body(
            self, item: WorkItem, inputs: tuple[str, ...] | None = None,
    ) -> tuple[dict[str, Any], tuple[str, ...] | None]:
        """The submit body, and the ``input_images`` URLs it carries (None without any).

        ``inputs`` (from the journal) resend exactly what an earlier submit carried."""
        params = dict(item.params)
        refs = params.get("input_images")
        if not refs:
            return {"prompt": item.prompt, "model": item.model, "fluxParams": params}, None
        if inputs is None or len(inputs) != len(refs):
            inputs = tuple([ref if is_remote_ref(ref) else await self._upload(ref)
                            for ref in refs])
        params["input_images"] = list(inputs)
        return {"prompt": item.prompt, "model": item.model, "fluxParams": params}, inputs

    async def _upload(self, path: str) -> str:
        """Upload a local reference image once per content hash; reuse its URL after (also
        one an earlier run uploaded, while the API keeps it)."""
        lock = self._upload_locks.setdefault(path, anyio.Lock())
        async with lock:
            digest = self._path_digests.get(path)
            if digest is not None and digest in self._uploads:
                return self._uploads[digest]
            data = await anyio.Path(path).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            self._path_digests[path] = digest
            url = self._uploads.get(digest)
            if url is None:
                result = await self._call("upload", lambda: self.client.upload(
                    data, filename=Path(path).name))
                url = result.url
                self._uploads[digest] = url
                self.store.journal_upload(digest, url, getattr(result, "expires_at", None))
            return url

    async def _call(self, route: str, make: Callable[[], Awaitable[Any]], *,
                    deadline: float | None = None,
                    throttle: Callable[[], Awaitable[None]] | None = None) -> Any:
        """One API request with the shared throttles and the retry policy. ``throttle`` is
        awaited before every attempt after the first (the caller awaited it for the first)."""
        policy = self.settings.request_retry
        first = self.clock()
        attempt = 0
        while True:
            if throttle is not None and attempt > 0:
                await throttle()
            await self.cooldown.wait()
            attempt += 1
            self.stats.requests[route] += 1
            sent_at = self.clock()
            try:
                return await make()
            except ApiError as exc:
                self._on_api_error(exc, route=route, sent_at=sent_at)
                elapsed = self.clock() - first
                if deadline is not None and self.clock() >= deadline:
                    raise
                if not policy.should_retry(exc, attempt, elapsed):
                    raise
                self.stats.retries += 1
                await self.sleep(policy.delay_for(exc, attempt, self.rng))

    def _on_api_error(self, exc: ApiError, *, route: str = "", sent_at: float = 0.0) -> None:
        if exc.category is ErrorCategory.RATE_LIMITED:
            pause = exc.retry_after if exc.retry_after is not None else 1.0
            if route == "submit":
                self.stats.submit_429 += 1
                if self._on_submit_rate_limited(sent_at, pause):
                    self.submit_cooldown.trigger(pause)
            else:
                self.cooldown.trigger(pause)
                self.inflight.on_rate_limited()
        elif exc.category is ErrorCategory.AUTH:
            fatal = RunAborted(f"the API refused the key: {exc.message}",
                               category=ErrorCategory.AUTH, exit_code=EXIT_ITEMS_FAILED)
            self.stop("the API key was refused", fatal=fatal)
            raise fatal from exc
        elif exc.category is ErrorCategory.INSUFFICIENT_CREDITS:
            fatal = RunAborted(f"out of credits: {exc.message}",
                               category=ErrorCategory.INSUFFICIENT_CREDITS,
                               exit_code=EXIT_ITEMS_FAILED)
            self.stop("out of credits (402)", fatal=fatal)
            raise _NotStarted from exc

    def _on_submit_rate_limited(self, sent_at: float, pause: float) -> bool:
        """A submit was answered 429. True when every submit should wait out ``pause``.

        A rate limit is paced, not paused for: the submit bucket learns the rate the provider
        accepted (SubmitRateLearner) and the request that met the 429 waits its Retry-After,
        as the official SDK's would, while the others go on at the learned rate (a provider's
        Retry-After rounds the time to its next token up to whole seconds: a pause of all
        submits for it would waste a second of the provider's rate each time). The first 429
        of a run, and one that says nothing of a rate (a storm, an outage), pause every submit.

        An in-flight cap answers 429 too; :class:`~batchflux.limits.CapDetector` tells it
        apart once the jobs running at these 429s have ended (see :meth:`_check_cap`).
        """
        self.caps.limited(self.clock())
        pinned = self.inflight.pinned
        if pinned is not None and self._jobs_open >= pinned - 1:
            return False  # the revealed cap's own 429 (a job ended later than we saw): no rate
        verdict = self.submit_rate.on_rate_limited(sent_at=sent_at, pause=pause)
        return verdict in ("first", "unmeasured")

    def _check_cap(self) -> None:
        """Pin the in-flight cap when the provider revealed one; its 429s were no rate."""
        cap = self.caps.cap(self.clock())
        if cap is not None and (self.inflight.maximum != cap or self.inflight.limit != cap):
            self.inflight.pin(cap)
            self.submit_rate.forget()

    async def _throttle_submit(self) -> None:
        while True:
            await self.submit_cooldown.wait()
            self.submit_rate.on_sent()
            await self.bucket.acquire()
            if not self.submit_cooldown.is_active:
                return

    async def _submit(self, ctx: _ItemContext, body: dict[str, Any],
                      inputs: tuple[str, ...] | None = None) -> None:
        item = ctx.item
        budget, cost = self.settings.budget, self.settings.cost_per_image
        if self.stopping:
            raise _NotStarted
        if budget is not None and self._committed_credits + cost > budget:
            self.stop(f"budget of {budget:g} credits reached")
            raise _NotStarted
        # Reserved before waiting for a token, so that workers waiting together cannot
        # overshoot the budget; given back if no job results.
        self._committed_credits += cost
        key = item.idempotency_key(ctx.submission)
        try:
            await self._throttle_submit()
            if self.stopping:
                raise _NotStarted
            self.store.journal_intent(item, ctx.submission, inputs)
            ctx.resend_inputs = inputs
            if ctx.first_sent_wall is None:
                ctx.first_sent_wall = time.time()
            accepted = await self._call(
                "submit", lambda: self.client.submit(body, idempotency_key=key),
                throttle=self._throttle_submit)
        except ApiError as exc:
            self._committed_credits -= cost
            raise _ItemFailed(_error_info(exc)) from exc
        except BaseException:
            self._committed_credits -= cost
            raise
        self.submit_rate.on_accepted()
        # A replay answers with a job that may be past QUEUED; one still QUEUED is told apart
        # by its creation time once we see it (see _note_job).
        ctx.replayed = bool(getattr(accepted, "replayed", False)) or accepted.status != "QUEUED"
        ctx.job_id = accepted.job_id
        ctx.jobs_created += 1
        ctx.submitted = self.clock()
        ctx.cap_token = next(self._job_tokens)
        self.caps.started(ctx.cap_token, ctx.submitted)
        self.store.journal_job(item, ctx.submission, accepted.job_id)

    async def _wait(self, ctx: _ItemContext) -> Any:
        """Poll until the job is terminal or its deadline passes. None: the API does not
        know the job (:attr:`ErrorCategory.LOST`)."""
        self._jobs_open += 1
        state = None
        try:
            state = await self._poll_until_done(ctx)
            return state
        finally:
            self._jobs_open -= 1
            if ctx.cap_token is not None:
                # The job's span at the provider: our submit + its own duration.
                duration = None if state is None else _job_seconds(state)
                end = None if duration is None or ctx.submitted is None else (
                    ctx.submitted + duration)
                self.caps.ended(ctx.cap_token, end)
                ctx.cap_token = None
                self._check_cap()

    async def _poll_until_done(self, ctx: _ItemContext) -> Any:
        assert ctx.job_id is not None
        job_id = ctx.job_id
        submitted = ctx.submitted if ctx.submitted is not None else self.clock()
        deadline = submitted + self.settings.job_timeout
        ctx.sightings = []
        while True:
            if ctx.attached and not ctx.sightings:
                delay = 0.0  # a re-attached job may be long done: look at it at once
            else:
                delay = next_poll_delay(self.settings.poll, self.timings, ctx.sightings,
                                        elapsed=self.clock() - submitted,
                                        expected=self.settings.expected_job_seconds)
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise _ItemFailed(ErrorInfo(
                    ErrorCategory.TIMEOUT,
                    f"job {job_id} not finished after {self.settings.job_timeout:g} s", True))
            await self.sleep(min(delay, remaining))
            try:
                state = await self._call("poll", lambda: self.client.get_job(job_id),
                                         deadline=deadline)
            except ApiError as exc:
                if exc.category is ErrorCategory.LOST:
                    return None
                raise _ItemFailed(_error_info(exc)) from exc
            ctx.polls += 1
            ctx.sightings.append(Sighting(self.clock() - submitted, state.status,
                                          state.progress))
            if state.status in TERMINAL_STATUSES:
                return state

    def _note_job(self, ctx: _ItemContext, state: Any) -> None:
        now = self.clock()
        if ctx.submitted is not None:
            ctx.generating = now - ctx.submitted
            if state.status == "COMPLETED":
                # The server's own timestamps give the job's true duration; what we saw also
                # holds our polling lag, which would make the estimate drift with the schedule.
                reported = _job_seconds(state)
                # What was seen of a re-attached job is not relative to its submit.
                self.timings.observe(ctx.generating if reported is None else reported,
                                     () if ctx.was_attached else ctx.sightings)
                if reported is not None and not ctx.was_attached:
                    # How long after its end the job was seen done: polling's whole cost in
                    # time (two durations, so no clock needs to agree with the server's).
                    self.stats.lags.append(max(0.0, ctx.generating - reported))
        if state.status == "COMPLETED":
            self.inflight.on_success()
        created = _unix_time(getattr(state, "created_at", None))
        if ctx.attached or (ctx.first_sent_wall is not None and created is not None
                            and created < ctx.first_sent_wall - REPLAY_SLACK):
            ctx.replayed = True
        cost = state.credit_cost or 0
        ctx.credit_cost = cost
        if ctx.submitted is not None:
            self._committed_credits -= self.settings.cost_per_image
        if not ctx.replayed:
            self._committed_credits += cost

    async def _download_all(self, ctx: _ItemContext, state: Any) -> tuple[StoredFile, ...]:
        if not state.images:
            raise _ItemFailed(ErrorInfo(ErrorCategory.DOWNLOAD_FAILED,
                                        "job completed without images", False))
        begin = self.clock()
        files = []
        for number, url in enumerate(state.images, start=1):
            files.append(await self._download_one(ctx, url, number))
        ctx.downloading = self.clock() - begin
        return tuple(files)

    async def _download_one(self, ctx: _ItemContext, url: str, number: int) -> StoredFile:
        item = ctx.item
        policy = self.settings.request_retry
        attempt = 0
        first = self.clock()
        while True:
            attempt += 1
            try:
                return await self._fetch_and_verify(item, url, number)
            except ApiError as exc:
                if exc.category is ErrorCategory.RATE_LIMITED:
                    self._on_api_error(exc)
                category = exc.category
                if category not in (ErrorCategory.EXPIRED,):
                    category = ErrorCategory.DOWNLOAD_FAILED if exc.category not in (
                        ErrorCategory.AUTH,) else exc.category
                info = ErrorInfo(category, exc.message, exc.retryable, exc.http_status)
                if not policy.should_retry(exc, attempt, self.clock() - first):
                    raise _ItemFailed(info) from exc
                await self.sleep(policy.delay_for(exc, attempt, self.rng))
            except ImageCheckError as exc:
                info = ErrorInfo(ErrorCategory.DOWNLOAD_FAILED, str(exc), True)
                if attempt >= policy.max_attempts:
                    raise _ItemFailed(info) from exc
                await self.sleep(policy.backoff(attempt, self.rng))
            self.stats.retries += 1

    async def _fetch_and_verify(self, item: WorkItem, url: str, number: int) -> StoredFile:
        self.stats.requests["download"] += 1
        await self.cooldown.wait()
        async with self.store.temp_image(item, number) as temp:
            await self.client.download(url, temp, max_bytes=self.settings.max_download_bytes)
        try:
            facts = inspect_container(temp.path)
            check = "structure"
            if self._should_decode():
                began = time.perf_counter()
                facts = await anyio.to_thread.run_sync(inspect_image, temp.path)
                self._decode_seconds += time.perf_counter() - began
                check = "decode"
            self.stats.checks[check] += 1
            check_expected(facts, item.params, input_size=await self._input_size(item))
            return await self.store.commit_image(
                temp, item, ext=facts.format, number=number, width=facts.width,
                height=facts.height, fmt=facts.format, check=check)
        except BaseException:
            try:
                temp.path.unlink()
            except OSError:
                pass
            raise

    def _should_decode(self) -> bool:
        mode = self.settings.verify
        if mode != "auto":
            return mode == "decode"
        elapsed = max(1.0, self.clock() - self.state.started)
        return self._decode_seconds <= self.settings.decode_share * elapsed

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

    # -- records and the summary -----------------------------------------------------------

    def _record(self, ctx: _ItemContext, *, status: str, error: ErrorInfo | None,
                files: tuple[StoredFile, ...]) -> dict[str, Any]:
        item = ctx.item
        total = self.clock() - ctx.started
        return {
            "key": item.key,
            "index": item.index,
            "prompt_id": item.prompt_id,
            "status": status,
            "model": item.model,
            "prompt": item.prompt,
            "template": item.template,
            "vars": dict(item.vars),
            "seed": item.seed,
            "params": _jsonable_params(item.params),
            "job_id": ctx.job_id,
            "submission": ctx.submission,
            "jobs": ctx.jobs_created + (1 if ctx.was_attached else 0),
            "polls": ctx.polls,
            "credit_cost": ctx.credit_cost,
            "replayed": ctx.replayed,
            "error": error.to_json() if error else None,
            "files": [f.to_json() for f in files],
            "timings": {
                "generating": _round(ctx.generating),
                "downloading": _round(ctx.downloading),
                "total": _round(total),
            },
            "started_at": ctx.started_at,
            "finished_at": utc_now(),
            "source": item.source,
            "meta": dict(item.meta),
        }

    def _account(self, record: Mapping[str, Any]) -> None:
        stats = self.stats
        status = record["status"]
        stats.by_status[status] += 1
        self.state.done += 1
        duplicate = record.get("duplicate_of") is not None
        if status == "ok":
            self.state.ok += 1
            if not duplicate:
                stats.latencies.append(record["timings"]["total"] or 0.0)
                stats.images += len(record["files"])
                stats.bytes += sum(f["bytes"] for f in record["files"])
        else:
            self.state.failed += 1
            stats.by_category[record["error"]["category"]] += 1
        if duplicate:
            return
        if record.get("replayed"):
            stats.replayed += 1
        else:
            stats.credits += record.get("credit_cost") or 0
        self.state.credits_spent = stats.credits

    def totals(self) -> dict[str, int | None]:
        """The whole run directory, as far as this run's items go: what is ok, what failed
        (and could be retried), what is still to do. Exit codes follow these."""
        stats = self.stats
        ok = stats.skipped_ok + stats.by_status.get("ok", 0)
        failed = stats.skipped_failed + stats.by_status.get("failed", 0)
        retryable = stats.skipped_failed_retryable + sum(
            n for category, n in stats.by_category.items()
            if category in _RETRYABLE_NAMES)
        total = self.state.total
        return {"items": total, "ok": ok, "failed": failed, "failed_retryable": retryable,
                "to_do": None if total is None else max(0, total - ok - failed)}

    def _summary(self, started_at: str) -> dict[str, Any]:
        stats = self.stats
        elapsed = max(self.clock() - self.state.started, 1e-9)
        ok = stats.by_status.get("ok", 0)
        failed = stats.by_status.get("failed", 0)
        totals = self.totals()
        not_started = stats.not_started if totals["to_do"] is None else totals["to_do"]
        return {
            "started_at": started_at,
            "finished_at": utc_now(),
            "elapsed_seconds": round(elapsed, 3),
            "total_items": self.state.total,
            "counts": {
                "ok": ok,
                "failed": failed,
                "skipped": self.state.skipped,
                "not_started": not_started,
                "new": stats.new,
                "retried": stats.retried_items,
                "reattached": stats.attached,
                "refetched": stats.refetched,
                "duplicates": stats.duplicates,
                "lost": stats.lost,
            },
            "totals": totals,
            "errors_by_category": dict(sorted(stats.by_category.items())),
            "credits_spent": stats.credits,
            "replayed_jobs": stats.replayed,
            "images": stats.images,
            "bytes": stats.bytes,
            "latency_seconds": {
                "p50": _round(percentile(stats.latencies, 0.5)),
                "p95": _round(percentile(stats.latencies, 0.95)),
            },
            "completion_lag_seconds": {
                "p50": _round(percentile(stats.lags, 0.5)),
                "p95": _round(percentile(stats.lags, 0.95)),
                "mean": _round(sum(stats.lags) / len(stats.lags)) if stats.lags else None,
            },
            "throughput": {
                "items_per_minute": round((ok + failed) * 60.0 / elapsed, 2),
                "images_per_minute": round(stats.images * 60.0 / elapsed, 2),
            },
            "requests": dict(sorted(stats.requests.items())),
            "retries": stats.retries,
            "verification": {"mode": self.settings.verify, "decode": stats.checks["decode"],
                             "structure": stats.checks["structure"]},
            "resubmissions": stats.resubmissions,
            "inflight_cap": {
                "max": self.settings.max_inflight,
                "final": self.inflight.limit,
                "history": [[round(max(0.0, t - self.state.started), 3), n]
                            for t, n in self.inflight.history],
            },
            "submit_rate": {
                "configured": self.settings.submits_per_second,
                "final": None if self.bucket.rate is None else round(self.bucket.rate, 3),
                "history": [[round(max(0.0, t - self.state.started), 3), round(r, 3)]
                            for t, r in self.submit_rate.history[-256:]],
                "rate_limited": stats.submit_429,
                "paused": self.submit_cooldown.triggers,
            },
            "stop_reason": self.state.stop_reason,
        }


@dataclass
class _ItemContext:
    item: WorkItem
    started: float
    started_at: str
    submission: int = 0
    job_id: str | None = None
    attached: bool = False
    was_attached: bool = False
    submitted: float | None = None
    jobs_created: int = 0
    polls: int = 0
    credit_cost: int | None = None
    generating: float | None = None
    downloading: float | None = None
    resend_inputs: tuple[str, ...] | None = None  # input URLs a resend must carry again
    refetch: bool = False  # an ok item whose images were gone
    replayed: bool = False  # the API answered with a job this run did not create
    first_sent_wall: float | None = None  # Unix time of this run's first submit of the item
    sightings: list[Sighting] = field(default_factory=list)  # the current job's answers
    cap_token: int | None = None  # names the current job to the CapDetector


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _jsonable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(params)
    refs = out.get("input_images")
    if refs:
        out["input_images"] = [ref if is_remote_ref(ref) else Path(ref).name for ref in refs]
    return out


def _job_seconds(state: Any) -> float | None:
    """Seconds from ``createdAt`` to ``completedAt`` as the API reports them, if it does."""
    created, completed = getattr(state, "created_at", None), getattr(state, "completed_at", None)
    if not created or not completed:
        return None
    try:
        seconds = (datetime.fromisoformat(completed) - datetime.fromisoformat(created))
    except (TypeError, ValueError):
        return None
    return seconds.total_seconds()


def _unix_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def _seconds_until(text: str | None) -> float:
    """Seconds from now until an ISO 8601 time (0 when unknown: assume it is gone)."""
    when = _unix_time(text)
    return 0.0 if when is None else when - time.time()


def _is_stale(intent: JournalIntent) -> bool:
    return intent.at is not None and time.time() - intent.at > IDEMPOTENCY_WINDOW


def _error_info(exc: ApiError) -> ErrorInfo:
    return ErrorInfo(exc.category, exc.message, exc.retryable, exc.http_status)

