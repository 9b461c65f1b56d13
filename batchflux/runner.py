"""The pool: every item of a run through the item lifecycle, many at once, in bounded memory.

Shape (DESIGN.md section 5)::

    feeder --(0-buffer stream)--> workers (each: Lifecycle.process) --(stream)--> one writer
              skips what is done;                                          appends result
              items with an earlier item's key                             lines, counts
              wait for its line (duplicates)                               them, reports

The pool owns only the flow: what to run (:func:`batchflux.resume.skip_reason`), the
workers, the single writer, stopping (:meth:`Runner.stop`, :meth:`Runner.cancel`, or a
``stop`` event) and the summary. What happens to one item is
:class:`batchflux.lifecycle.Lifecycle`'s; when the provider says to slow down is
:class:`batchflux.limits.SubmitGate`'s; how a job's end is learned is the completion
source's (:mod:`batchflux.completion`).

Per-item failures are data (a result line with an error category). Run-fatal conditions
(401/403, 402, budget, unwritable output) stop submitting; what is in flight is journaled and
the next run re-attaches to it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .completion import CompletionSource, PollingCompletion
from .errors import RunAborted
from .lifecycle import ApiClient, ItemStore, Lifecycle, LifecycleSettings, LifecycleStats
from .limits import Budget, SubmitGate
from .models import ErrorCategory, Result, RunState, WebhookRequest, WorkItem
from .resume import skip_reason
from .retry import JobTimings, PollPolicy, RetryPolicy
from .stats import percentile, rounded, utc_now
from .store import ResumeIndex, key_id
from .summary import Tally

__all__ = ["NullReporter", "Reporter", "RunSettings", "Runner", "duplicate_record",
           "initial_inflight", "workers_for"]

#: The in-flight cap's first value is half of ``-j`` (at least this many, or all of ``-j``
#: when it is smaller): moderate, so that a provider with a low cap meets few 429s, and one
#: job round trip of slow start (which doubles it) from the ceiling.
SLOW_START_INITIAL = 16

_RETRYABLE_NAMES = frozenset(c.value for c in ErrorCategory if c.retryable)


class Reporter(Protocol):
    """Where a run tells how it goes (:mod:`batchflux.progress` has the terminal, log and
    JSON ones)."""

    def start(self, *, total: int | None, skipped: int, attached: int) -> None: ...
    def result(self, record: Result) -> None: ...
    def status(self, state: RunState) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, summary: Mapping[str, Any]) -> None: ...


class NullReporter:
    """A reporter that says nothing (the library's default)."""

    def start(self, *, total: int | None, skipped: int, attached: int) -> None:
        """Nothing."""

    def result(self, record: Result) -> None:
        """Nothing."""

    def status(self, state: RunState) -> None:
        """Nothing."""

    def message(self, text: str) -> None:
        """Nothing."""

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Nothing."""


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How a run behaves. Every field has a named default; build with keywords.

    ``max_inflight`` is ``-j``: jobs in flight, the ceiling of the adaptive cap, which slow
    starts from ``initial_inflight`` (None: :func:`initial_inflight`, shared out among
    ``sharers``, the shard processes that start together on one key). ``concurrency`` is the
    number of workers (None: :func:`workers_for`). The other fields are the lifecycle's
    (:class:`~batchflux.lifecycle.LifecycleSettings`) and the poll schedule's.
    """

    max_inflight: int = 32
    initial_inflight: int | None = None
    sharers: int = 1  # processes that start together on one key (the shards of a run)
    concurrency: int | None = None
    submits_per_second: float | None = None
    retries: int = 4
    request_retry: RetryPolicy = field(default_factory=RetryPolicy)
    poll: PollPolicy = field(default_factory=PollPolicy)
    job_timeout: float = 600.0
    budget: float | None = None
    cost_per_image: float = 2.0
    retry_failed: str | None = None  # None | "retryable" | "all"
    max_download_bytes: int = 64 << 20
    expected_job_seconds: float | None = None
    seed: int | None = None  # for jitter; None: from the OS
    verify: str = "auto"
    decode_share: float = 0.1
    webhook: WebhookRequest | None = None  # the webhook fields each new submit carries

    def lifecycle(self) -> LifecycleSettings:
        """The settings the item lifecycle reads."""
        return LifecycleSettings(retries=self.retries, request_retry=self.request_retry,
                                 job_timeout=self.job_timeout,
                                 max_download_bytes=self.max_download_bytes,
                                 verify=self.verify, decode_share=self.decode_share,
                                 webhook=self.webhook)


def initial_inflight(max_inflight: int, *, sharers: int = 1) -> int:
    """Where slow start begins for a ceiling of ``max_inflight`` jobs in flight. Alone, a run
    opens with half of it (at least 16, or all of a smaller ceiling). ``sharers`` processes
    (the shards of one run) that start together on one key share ``max_inflight`` out among
    them, never opening with more than a run alone: three shards of ``-j 32`` open with 10
    each, 30 in all, where three runs alone would put 48 at once against the provider's
    opening bucket; a shard that opened with much less would spend seconds slow-starting
    while the key's tokens went unused.

    >>> initial_inflight(128), initial_inflight(8), initial_inflight(32, sharers=3)
    (64, 8, 10)
    """
    alone = max(min(max_inflight, SLOW_START_INITIAL), max_inflight // 2)
    if sharers <= 1:
        return alone
    return max(1, min(alone, max_inflight // sharers))


def submit_gate(settings: RunSettings, *, clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> SubmitGate:
    """The gate a run with ``settings`` submits through: its in-flight cap (slow start from
    :func:`initial_inflight`, up to ``-j``), its submit rate (``--rpm``, else learned) and
    the share of a key it starts with when it is one of several shards."""
    return SubmitGate(
        ceiling=settings.max_inflight,
        initial=settings.initial_inflight or initial_inflight(settings.max_inflight,
                                                              sharers=settings.sharers),
        rate=settings.submits_per_second, sharers=settings.sharers, clock=clock, sleep=sleep)


def workers_for(settings: RunSettings) -> int:
    """Workers for a run: one per job in flight, plus room for the downloads (and result
    lines) of jobs that just finished, so that downloads never hold a job slot idle."""
    if settings.concurrency is not None:
        return max(1, settings.concurrency)
    return settings.max_inflight + max(4, settings.max_inflight // 4)


def duplicate_record(item: WorkItem, original: Result) -> Result:
    """The result line of ``item``, whose request is the same as ``original``'s item: it was
    generated once, for the first; this line points at the same files."""
    now = utc_now()
    return replace(original, index=item.index, prompt_id=item.prompt_id,
                   template=item.template, vars=dict(item.vars),
                   duplicate_of=original.index, jobs=0, polls=0, replayed=False,
                   timings=replace(original.timings, generating=None, downloading=None,
                                   total=0.0),
                   started_at=now, finished_at=now, source=item.source, meta=dict(item.meta),
                   reroll_of=item.reroll_of, attempt=item.attempt)


@dataclass
class _KeyGroup:
    """The items of one run that share a key: the first runs, the others wait for its line."""

    first_index: int
    record: Result | None = None
    pending: list[WorkItem] = field(default_factory=list)


@dataclass
class _Counts:
    """What the feeder and the writer counted (the lifecycle counts the rest)."""

    skipped_ok: int = 0
    skipped_failed: int = 0
    skipped_failed_retryable: int = 0
    retried: int = 0
    refetched: int = 0
    duplicates: int = 0


class Runner:
    """Runs every item of a run through :class:`~batchflux.lifecycle.Lifecycle`.

    ``completion`` replaces polling as the way job ends are learned (built with the
    lifecycle, so that it can ask the API through it); ``stop`` stops the run when set, as
    Ctrl-C does (in-flight jobs stay journaled).
    """

    def __init__(
        self,
        *,
        client: ApiClient,
        store: ItemStore,
        index: ResumeIndex,
        settings: RunSettings,
        reporter: Reporter | None = None,
        completion: Callable[[Lifecycle], CompletionSource] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.store, self.index, self.settings = store, index, settings
        self.reporter: Reporter = reporter or NullReporter()
        self.clock = clock
        self.state = RunState(inflight_cap=settings.max_inflight)
        self.gate = submit_gate(settings, clock=clock, sleep=sleep)
        self.budget = Budget(settings.budget, cost=settings.cost_per_image)
        self.timings = JobTimings()
        self.stats = LifecycleStats()
        self.tally = Tally()
        self.counts = _Counts()
        self._fatal: RunAborted | None = None
        self._work_scope: anyio.CancelScope | None = None
        self._duplicate_ids: frozenset[int] = frozenset()
        self._groups: dict[int, _KeyGroup] = {}
        self.lifecycle = Lifecycle(
            client=client, store=store, index=index, gate=self.gate, budget=self.budget,
            completion=_Deferred(), timings=self.timings, control=self,
            settings=settings.lifecycle(), stats=self.stats, clock=clock, sleep=sleep,
            rng=random.Random(settings.seed))
        self.lifecycle.completion = (completion or self._polling)(self.lifecycle)

    def _polling(self, lifecycle: Lifecycle) -> CompletionSource:
        return PollingCompletion(fetch=lifecycle.fetch_job, timings=self.timings,
                                 policy=self.settings.poll,
                                 expected=self.settings.expected_job_seconds,
                                 clock=self.clock, sleep=lifecycle.sleep)

    # -- stopping --------------------------------------------------------------------------

    def stop(self, reason: str, *, fatal: RunAborted | None = None) -> None:
        """Stop submitting new jobs; in-flight jobs finish (they are paid for). ``fatal`` is
        raised when the run ends (out of credits, a refused key)."""
        if self.state.stop_reason is None:
            self.state.stop_reason = reason
            self.reporter.message(f"stopping: {reason}")
        if fatal is not None and self._fatal is None:
            self._fatal = fatal

    @property
    def stopping(self) -> bool:
        """True once the run stops submitting."""
        return self.state.stop_reason is not None

    def cancel(self) -> None:
        """Stop at once: no new submits, in-flight work abandoned (it stays journaled)."""
        if self._work_scope is not None:
            self._work_scope.cancel()

    # -- the pool ----------------------------------------------------------------------------

    async def run(self, items: Iterable[WorkItem], *, total: int | None = None,
                  duplicates: frozenset[int] = frozenset(),
                  summary_extra: Mapping[str, Any] | None = None,
                  stop: anyio.Event | None = None) -> dict[str, Any]:
        """Run every item; return the summary (also written to summary.json, once, with
        ``summary_extra`` merged in). Raises the :class:`~batchflux.errors.RunAborted` that
        stopped the run, if one did, with the summary on it.

        ``duplicates`` are the key ids that more than one item has
        (:func:`batchflux.resume.scan_items`): the first item of each runs, the others are
        recorded as its duplicates once it ends.
        """
        self.state.started = self.lifecycle.started = self.clock()
        self.state.total = total
        self._duplicate_ids = duplicates
        started_at = utc_now()
        send, receive = anyio.create_memory_object_stream[WorkItem](0)
        results_send, results_receive = anyio.create_memory_object_stream[Result](64)
        self.reporter.start(total=total, skipped=0, attached=len(self.index.jobs))
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._ticker)
                if stop is not None:
                    outer.start_soon(self._watch, stop)
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
            summary = {**self.summary(started_at), **(summary_extra or {})}
            try:
                self.store.write_summary(summary)  # type: ignore[attr-defined]
            except OSError as exc:
                self.reporter.message(f"could not write summary.json: {exc.strerror or exc}")
            self.reporter.finish(summary)
        if self._fatal is not None:
            self._fatal.summary = summary
            raise self._fatal
        return summary

    async def _watch(self, stop: anyio.Event) -> None:
        await stop.wait()
        self.stop("interrupted")
        self.cancel()

    async def _feeder(self, items: Iterable[WorkItem], send: ObjectSendStream[WorkItem],
                      results: ObjectSendStream[Result]) -> None:
        counts = self.counts
        async with send, results:
            for item in items:
                if self.stopping:
                    break
                kid = key_id(item.key)
                group = self._groups.get(kid) if self._duplicate_ids else None
                if group is not None:
                    # The same request as an earlier item of this run: generated once.
                    counts.duplicates += 1
                    if group.record is None:
                        group.pending.append(item)
                    else:
                        await results.send(duplicate_record(item, group.record))
                    continue
                if self._skip(item):
                    continue
                if kid in self._duplicate_ids:
                    self._groups[kid] = _KeyGroup(first_index=item.index)
                await send.send(item)

    def _skip(self, item: WorkItem) -> bool:
        """Count an item the feeder does not send; False for one to run."""
        counts = self.counts
        reason = skip_reason(self.index, item.key, self.settings.retry_failed)
        if reason is None:
            if self.index.prior_failure(item.key) is not None:
                counts.retried += 1
            elif self.index.missing_files(item.key) is not None:
                counts.refetched += 1
            return False
        self.state.skipped += 1
        if reason == "ok":
            counts.skipped_ok += 1
        else:
            counts.skipped_failed += 1
            prior = self.index.prior_failure(item.key)
            counts.skipped_failed_retryable += bool(prior and prior.retryable)
        return True

    async def _worker(self, receive: ObjectReceiveStream[WorkItem],
                      results: ObjectSendStream[Result]) -> None:
        async with receive, results:
            async for item in receive:
                record = await self.lifecycle.process(item)
                if record is not None:
                    await results.send(record)

    async def _writer(self, receive: ObjectReceiveStream[Result]) -> None:
        async with receive:
            async for record in receive:
                for line in self._with_duplicates(record):
                    try:
                        self.store.append_result(line)  # type: ignore[attr-defined]
                    except RunAborted as exc:
                        # Nothing more can be recorded: stop everything. Jobs in flight stay
                        # in the journal and the next run re-attaches to them.
                        self.stop(str(exc), fatal=exc)
                        self.cancel()
                        return
                    self._account(line)
                    self.reporter.result(line)

    def _with_duplicates(self, record: Result) -> list[Result]:
        """``record`` and the lines of the items that wait for it (same key, later index)."""
        if record.duplicate_of is not None or not self._duplicate_ids:
            return [record]
        group = self._groups.get(key_id(record.key))
        if group is None or group.first_index != record.index:
            return [record]
        group.record = record
        pending, group.pending = group.pending, []
        return [record, *(duplicate_record(item, record) for item in pending)]

    def _account(self, record: Result) -> None:
        self.tally.add(record)
        state = self.state
        state.done += 1
        if record.ok:
            state.ok += 1
        else:
            state.failed += 1
        state.credits_spent = self.tally.credits

    async def _ticker(self) -> None:
        last_sync = self.clock()
        while True:
            await self.lifecycle.sleep(0.5)
            self.state.inflight = self.gate.jobs_open
            self.state.inflight_cap = self.gate.inflight.limit
            self.state.cooldown_remaining = self.gate.waiting_for_rate_limit
            self.reporter.status(self.state)
            if self.clock() - last_sync >= 2.0:
                last_sync = self.clock()
                await anyio.to_thread.run_sync(self.store.sync)  # type: ignore[attr-defined]

    # -- the summary ---------------------------------------------------------------------------

    def totals(self) -> dict[str, int | None]:
        """The whole run directory, as far as this run's items go: what is ok, what failed
        (and could be retried), what is still to do. Exit codes follow these."""
        counts, tally = self.counts, self.tally
        ok = counts.skipped_ok + tally.ok
        failed = counts.skipped_failed + tally.failed
        retryable = counts.skipped_failed_retryable + sum(
            n for category, n in tally.by_category.items() if category in _RETRYABLE_NAMES)
        total = self.state.total
        return {"items": total, "ok": ok, "failed": failed, "failed_retryable": retryable,
                "to_do": None if total is None else max(0, total - ok - failed)}

    def summary(self, started_at: str) -> dict[str, Any]:
        """summary.json: this run's counts, the directory's totals, and how the run went."""
        stats, tally, counts, gate = self.stats, self.tally, self.counts, self.gate
        elapsed = max(self.clock() - self.state.started, 1e-9)
        totals = self.totals()
        records = tally.to_json()
        lags = self.lifecycle.lags
        delays = self.lifecycle.download_delays
        return {
            "started_at": started_at,
            "finished_at": utc_now(),
            "elapsed_seconds": round(elapsed, 3),
            "total_items": self.state.total,
            "counts": {
                **records["counts"],
                "skipped": self.state.skipped,
                "not_started": stats.not_started if totals["to_do"] is None
                else totals["to_do"],
                "new": stats.new, "retried": counts.retried, "reattached": stats.attached,
                "refetched": counts.refetched, "duplicates": counts.duplicates,
                "lost": stats.lost,
            },
            "totals": totals,
            **{k: v for k, v in records.items() if k != "counts"},
            "completion_lag_seconds": {
                "p50": rounded(percentile(lags, 0.5)), "p95": rounded(percentile(lags, 0.95)),
                "mean": rounded(sum(lags) / len(lags)) if lags else None},
            # From a job's completedAt (the API's clock) to the start of its download (ours).
            "download_delay_seconds": {
                "p50": rounded(percentile(delays, 0.5)),
                "p95": rounded(percentile(delays, 0.95))},
            "throughput": {
                "items_per_minute": round((tally.ok + tally.failed) * 60.0 / elapsed, 2),
                "images_per_minute": round(tally.images * 60.0 / elapsed, 2)},
            "requests": dict(sorted(stats.requests.items())),
            "retries": stats.retries,
            "verification": {"mode": self.settings.verify, "decode": stats.checks["decode"],
                             "structure": stats.checks["structure"]},
            "resubmissions": stats.resubmissions,
            "inflight_cap": {
                "max": self.settings.max_inflight, "final": gate.inflight.limit,
                "history": [[round(max(0.0, t - self.state.started), 3), n]
                            for t, n in gate.inflight.history]},
            "submit_rate": {
                "configured": self.settings.submits_per_second,
                "final": None if gate.bucket.rate is None else round(gate.bucket.rate, 3),
                "history": [[round(max(0.0, t - self.state.started), 3), round(r, 3)]
                            for t, r in gate.learner.history[-256:]],
                "rate_limited": gate.submit_429, "paused": gate.submit_pause.triggers},
            "stop_reason": self.state.stop_reason,
            **self.lifecycle.completion.summary(),
        }


class _Deferred:
    """Stands in for the completion source while the lifecycle that it needs is built."""

    async def wait(self, job: Any) -> Any:  # pragma: no cover - replaced before any run
        raise RuntimeError("the completion source was not set")

    def summary(self) -> Mapping[str, Any]:  # pragma: no cover - replaced before any run
        return {}
