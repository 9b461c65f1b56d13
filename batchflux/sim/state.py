"""The simulator's in-memory world: jobs, credits, idempotency, uploads, limiters, counters.

Job status is derived lazily from the clock at read time (see ``Job.status_at``); the only
bookkeeping done "when a job ends" (refunds, in-flight counts) happens in ``SimState.settle``,
which every request calls first and which costs O(1) unless jobs have just ended.

Every change a client can see later (a job created, an upload, a cancel, a webhook outcome, the
balance set) is a record of :mod:`.persist`, applied by ``SimState._apply``: live, after it was
written to the state directory's journal when there is one; on start, when the journal is
replayed. So the world after a restart is the world before it, at the clock's new time.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import heapq
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .faults import FaultPlan, TokenBucket
from .persist import (
    CreditsSet,
    JobCancelled,
    JobCreated,
    Record,
    StateJournal,
    UploadStored,
    WebhookSettled,
)
from .render import ImageCache
from .settings import SimSettings

Clock = Callable[[], float]

TEAM_ID = "5a1d5c1e-0000-4000-8000-000000000001"
USER_ID = "5a1d5c1e-0000-4000-8000-000000000002"


def iso_ms(timestamp: float) -> str:
    """``2026-03-15T10:00:00.000Z`` for a Unix timestamp."""
    millis = round(timestamp * 1000)
    seconds, ms = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def canonical_hash(body: Any) -> str:
    """sha256 of a JSON body with sorted keys and no whitespace."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def key_id(api_key: str) -> str:
    """A stable public id for an API key (never the key itself)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "batchflux-sim-key:" + api_key))


@dataclass(slots=True)
class Job:
    """One generation job. Times are Unix seconds from the simulator's clock; ``owner`` is the
    public id of the API key that created it (``key_id``)."""

    id: str
    owner: str
    model: str
    body: dict[str, Any]
    created: float
    started: float  # end of QUEUED
    ends: float  # COMPLETED or FAILED from here on
    error: str | None
    cost: int
    size: tuple[int, int]
    output_format: str
    quality: int
    seed: int
    base_url: str
    idempotency_key: str | None = None
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = ()
    webhook_status: str | None = None
    cancelled_at: float | None = None
    settled: bool = False
    index: int = 0  # position in its key's job list
    # webhook sender bookkeeping
    wh_last_progress: int = -1
    wh_busy: bool = False
    wh_final: bool = False
    wh_failed: bool = False

    @property
    def prompt(self) -> str:
        return str(self.body["prompt"])

    @property
    def aspect_ratio(self) -> str:
        return str(self.body.get("fluxParams", {}).get("aspect_ratio", "1:1"))

    @property
    def image_name(self) -> str:
        return f"{self.id}-1.{self.output_format}"

    def status_at(self, now: float, steps: int) -> tuple[str, int]:
        """``(status, progress)`` at time ``now``; progress rises linearly in ``steps`` steps."""
        if self.cancelled_at is not None and now >= self.cancelled_at:
            return "CANCELLED", 0
        if now < self.started:
            return "QUEUED", 0
        if now < self.ends:
            if self.error is not None:
                # A job that will fail shows progress on the same scale as one that completes.
                span = (self.ends - self.started) / 0.3
            else:
                span = self.ends - self.started
            fraction = (now - self.started) / span if span > 0 else 1.0
            return "PROCESSING", min(99, int(fraction * steps) * 100 // steps)
        if self.error is not None:
            return "FAILED", 0
        return "COMPLETED", 100

    def is_expired(self, now: float, asset_ttl: float) -> bool:
        return self.error is None and self.cancelled_at is None and now >= self.ends + asset_ttl


@dataclass(slots=True)
class Upload:
    """An uploaded file, served at ``/cdn/uploads/{id}.{ext}`` until ``expires``."""

    id: str
    owner: str
    data: bytes
    content_type: str
    kind: str
    ext: str
    created: float
    expires: float


@dataclass(slots=True)
class IdempotencyEntry:
    """What an ``Idempotency-Key`` of one API key stands for, until ``expires``."""

    body_hash: str
    job_id: str
    expires: float


@dataclass(slots=True)
class Counters:
    """What ``GET /_sim/stats`` reports."""

    jobs_created: int = 0
    idempotent_replays: int = 0
    rate_limited: int = 0
    peak_inflight: int = 0
    duplicate_jobs: int = 0
    credits_spent: int = 0
    credits_refunded: int = 0
    completed_jobs: int = 0
    failed_jobs: int = 0
    downloads: int = 0
    uploads: int = 0
    webhooks_delivered: int = 0
    webhooks_failed: int = 0
    webhook_attempts: int = 0
    webhooks_dropped: int = 0
    webhooks_duplicated: int = 0
    webhooks_delayed: int = 0
    requests: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    errors_injected: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def count_request(self, label: str, status: str) -> None:
        by_status = self.requests[label]
        by_status[status] = by_status.get(status, 0) + 1


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a while (if it was on)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class SimState:
    """Everything the simulator remembers. One instance per app, in ``app.state.sim``.

    With a ``journal`` (an open state directory) the world is first replayed from it, and every
    change is written to it before it is applied, so a new ``SimState`` on the same directory
    continues the same world.
    """

    def __init__(self, settings: SimSettings, *, clock: Clock = time.time,
                 journal: StateJournal | None = None) -> None:
        self.clock = clock
        self.settings = settings
        self._journal = journal
        self._api_keys: dict[str, str] = {}  # owner -> API key, in memory only
        self._owners: dict[str, str] = {}  # API key -> owner
        self._clear()
        if journal is not None:
            self._replay(journal)
        self._configure_credits(self.clock())

    @property
    def journal(self) -> StateJournal | None:
        """The open state directory, or None for a world that lives in memory only."""
        return self._journal

    def close(self) -> None:
        """Release the state directory (if any); the in-memory world stays readable."""
        if self._journal is not None:
            self._journal.close()

    def reset(self) -> None:
        """Forget every job, upload and counter; credits back to the configured amount."""
        now = self.clock()
        if self._journal is not None:
            self._journal.reset(now=now)
        self._clear()
        self._configure_credits(now)

    def _clear(self) -> None:
        s = self.settings
        self.plan = FaultPlan(s.fault_seed)
        self.credits = s.credits
        self._configured_credits: int | None = None  # the last CreditsSet
        self.jobs: dict[str, Job] = {}
        self.jobs_by_key: dict[str, list[Job]] = defaultdict(list)  # by owner
        self.inflight_by_key: dict[str, dict[str, Job]] = defaultdict(dict)  # by owner
        self.inflight = 0
        self._ending: list[tuple[float, str]] = []
        self.idempotency: dict[tuple[str, str], IdempotencyEntry] = {}  # (owner, key)
        # (owner, body hash) -> the latest job with that body: a new job for the same body is a
        # duplicate (paid twice) unless that job ended FAILED/CANCELLED (refunded).
        self.seen_bodies: dict[tuple[str, str], Job] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.storm_started: float | None = None  # the first submit's time (storm_seconds)
        self.uploads: dict[str, Upload] = {}
        self.images = ImageCache(s.render_cache_size)
        self.webhook_jobs: dict[str, Job] = {}
        self.counters = Counters()

    def _configure_credits(self, now: float) -> None:
        """A new world starts with ``settings.credits``; a replayed one keeps its balance
        unless the setting changed since (then the balance is set to it, as a live change of
        the setting does)."""
        if self._configured_credits != self.settings.credits:
            self.settle(now)
            self._commit(CreditsSet(at=now, balance=self.settings.credits))

    def update_settings(self, settings: SimSettings) -> None:
        """Apply new settings to a running simulator (state is kept; limiters restart)."""
        old = self.settings
        self.settings = settings
        if (old.rps, old.burst) != (settings.rps, settings.burst):
            self.buckets.clear()
        if old.fault_seed != settings.fault_seed:
            self.plan = FaultPlan(settings.fault_seed)
        if old.render_cache_size != settings.render_cache_size or \
                old.render_mode != settings.render_mode:
            self.images = ImageCache(settings.render_cache_size)
        if old.credits != settings.credits:
            self._configure_credits(self.clock())

    # -- API keys -------------------------------------------------------------------------------

    def owner_of(self, api_key: str) -> str:
        """The public id that owns ``api_key``'s jobs (what the state and its journal store
        instead of the key); remembers the key for signing webhooks."""
        owner = self._owners.get(api_key)
        if owner is None:
            owner = self._owners[api_key] = key_id(api_key)
            self._api_keys[owner] = api_key
        return owner

    def api_key_for(self, owner: str) -> str | None:
        """The API key behind ``owner``, once a request with it was seen by this process."""
        return self._api_keys.get(owner)

    # -- changes: written to the journal, then applied -------------------------------------------

    def _commit(self, record: JobCreated | JobCancelled | WebhookSettled | CreditsSet) -> None:
        if self._journal is not None:
            self._journal.append(record)
        self._apply(record)

    def _apply(self, record: Record) -> None:
        if isinstance(record, JobCreated):
            self._admit(record)
        elif isinstance(record, JobCancelled):
            job = self.jobs.get(record.job_id)
            if job is not None and not job.settled:
                job.cancelled_at = record.at
                self._finish(job, failed=True)
        elif isinstance(record, WebhookSettled):
            job = self.jobs.get(record.job_id)
            if job is not None:
                job.webhook_status = record.status
                self.webhook_jobs.pop(job.id, None)
        elif isinstance(record, CreditsSet):
            self.credits = self._configured_credits = record.balance
        else:
            raise TypeError(f"not a change to apply here: {record!r}")

    def _replay(self, journal: StateJournal) -> None:
        now = self.clock()
        with _collector_paused():  # no cycles are made; collecting would rescan every job
            self._replay_records(journal, now)
        journal.prune_uploads({f"{u.id}.{u.ext}" for u in self.uploads.values()})
        self.idempotency = {k: e for k, e in self.idempotency.items() if e.expires > now}
        self.settle(now)

    def _replay_records(self, journal: StateJournal, now: float) -> None:
        for record in journal.records():
            self.settle(record.at)  # as every live change settles first
            if isinstance(record, UploadStored):
                if record.expires > now and \
                        (data := journal.read_upload(record.file_name)) is not None:
                    self._add_upload(record, data)
            else:
                self._apply(record)

    # -- time passing -------------------------------------------------------------------------

    def settle(self, now: float) -> None:
        """Book every job that ended by ``now``: refunds, in-flight counts, outcome counters."""
        ending = self._ending
        while ending and ending[0][0] <= now:
            _, job_id = heapq.heappop(ending)
            job = self.jobs.get(job_id)
            if job is not None and not job.settled:
                self._finish(job, failed=job.error is not None)

    def _finish(self, job: Job, *, failed: bool) -> None:
        job.settled = True
        if self.inflight_by_key[job.owner].pop(job.id, None) is not None:
            self.inflight -= 1
        if failed:
            self.credits += job.cost
            self.counters.credits_refunded += job.cost
            self.counters.credits_spent -= job.cost
            self.counters.failed_jobs += 1
        else:
            self.counters.completed_jobs += 1

    def cancel(self, job: Job, now: float) -> None:
        """Test hook: the job turns CANCELLED now (refunded) unless it has already ended."""
        self.settle(now)
        if not job.settled:
            self._commit(JobCancelled(at=now, job_id=job.id))

    def settle_webhook(self, job: Job, status: str) -> None:
        """The job's webhook deliveries are over: ``delivered`` or ``failed``."""
        self._commit(WebhookSettled(at=self.clock(), job_id=job.id, status=status))

    # -- limits -------------------------------------------------------------------------------

    def take_submit_token(self, api_key: str) -> float:
        """0.0 when a submit may proceed, else seconds until it may."""
        rps = self.settings.rps
        if rps is None:
            return 0.0
        bucket = self.buckets.get(api_key)
        if bucket is None:
            burst = self.settings.burst or max(1, int(rps + 0.999))
            bucket = self.buckets[api_key] = TokenBucket(rps, float(burst), self.clock)
        return bucket.try_take()

    def inflight_wait(self, owner: str, now: float) -> float | None:
        """None when under the in-flight cap, else seconds until the key's next job ends."""
        cap = self.settings.max_inflight
        running = self.inflight_by_key[owner]
        if cap is None or len(running) < cap:
            return None
        return max(0.0, min(job.ends for job in running.values()) - now)

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, *, owner: str, body: dict[str, Any], body_hash: str, now: float,
                   size: tuple[int, int], base_url: str,
                   idempotency_key: str | None = None) -> Job:
        """Draw the job's fate, pay for it, remember it (under ``idempotency_key`` too)."""
        s = self.settings
        fate = self.plan.job_fate(s)
        params = body.get("fluxParams", {})
        started = now + fate.queue_seconds
        record = JobCreated(
            at=now,
            id=str(uuid.uuid4()),
            owner=owner,
            model=body["model"],
            body=body,
            body_hash=body_hash,
            started=started,
            ends=started + fate.run_seconds,
            error=fate.error,
            cost=s.cost_per_image,
            size=size,
            output_format=params.get("output_format", "webp"),
            quality=params.get("output_quality", 80),
            seed=params["seed"] if "seed" in params
            else self.plan._stream("seeds").randrange(2**31),
            base_url=base_url,
            idempotency_key=idempotency_key,
            idempotency_expires=None if idempotency_key is None else now + s.idempotency_ttl,
        )
        self._commit(record)
        return self.jobs[record.id]

    def _admit(self, record: JobCreated) -> None:
        now = record.at
        job = Job(
            id=record.id,
            owner=record.owner,
            model=record.model,
            body=record.body,
            created=now,
            started=record.started,
            ends=record.ends,
            error=record.error,
            cost=record.cost,
            size=record.size,
            output_format=record.output_format,
            quality=record.quality,
            seed=record.seed,
            base_url=record.base_url,
            idempotency_key=record.idempotency_key,
        )
        body = record.body
        if "webhookUrl" in body:
            job.webhook_url = body["webhookUrl"]
            job.webhook_events = tuple(body.get("webhookEvents") or ("completed", "failed"))
            job.webhook_status = "pending"
            self.webhook_jobs[job.id] = job
        keyed = self.jobs_by_key[job.owner]
        job.index = len(keyed)
        keyed.append(job)
        self.jobs[job.id] = job
        heapq.heappush(self._ending, (job.ends, job.id))
        self.inflight_by_key[job.owner][job.id] = job
        self.inflight += 1
        self.credits -= job.cost
        c = self.counters
        c.jobs_created += 1
        c.credits_spent += job.cost
        c.peak_inflight = max(c.peak_inflight, self.inflight)
        seen = (job.owner, record.body_hash)
        earlier = self.seen_bodies.get(seen)
        if earlier is not None:
            earlier_status, _ = earlier.status_at(now, self.settings.progress_steps)
            if earlier_status not in ("FAILED", "CANCELLED"):
                c.duplicate_jobs += 1
        self.seen_bodies[seen] = job
        if record.idempotency_key is not None and record.idempotency_expires is not None:
            self.idempotency[(job.owner, record.idempotency_key)] = IdempotencyEntry(
                record.body_hash, job.id, record.idempotency_expires)

    # -- uploads --------------------------------------------------------------------------------

    def add_upload(self, *, owner: str, data: bytes, content_type: str, kind: str, ext: str,
                   now: float) -> Upload:
        """Store an upload (its bytes first, then its record) until ``upload_ttl`` from now."""
        record = UploadStored(at=now, id=str(uuid.uuid4()), owner=owner,
                              content_type=content_type, kind=kind, ext=ext,
                              expires=now + self.settings.upload_ttl, byte_size=len(data))
        if self._journal is not None:
            self._journal.store_upload(record.file_name, data)
            self._journal.append(record)
        return self._add_upload(record, data)

    def _add_upload(self, record: UploadStored, data: bytes) -> Upload:
        item = Upload(id=record.id, owner=record.owner, data=data,
                      content_type=record.content_type, kind=record.kind, ext=record.ext,
                      created=record.at, expires=record.expires)
        self.uploads[item.id] = item
        self.counters.uploads += 1
        return item

    def job_json(self, job: Job, now: float, base_url: str) -> dict[str, Any]:
        """The job as ``GET /v2/jobs/{id}`` shows it (every OAS ``Job`` key, plus ``expired``)."""
        status, progress = job.status_at(now, self.settings.progress_steps)
        terminal = status in ("COMPLETED", "FAILED", "CANCELLED")
        return {
            "id": job.id,
            "status": status,
            "model": job.model,
            "progress": progress,
            "result": ({"images": [f"{base_url}/cdn/images/{job.image_name}"]}
                       if status == "COMPLETED" else None),
            "error": job.error if status == "FAILED" else None,
            "creditCost": job.cost if status in ("QUEUED", "PROCESSING", "COMPLETED") else 0,
            "webhookStatus": job.webhook_status,
            "createdAt": iso_ms(job.created),
            "completedAt": iso_ms(job.ends if job.cancelled_at is None else job.cancelled_at)
            if terminal else None,
            "expired": job.is_expired(now, self.settings.asset_ttl),
            "input": job.body,
        }

    def ledger_json(self, now: float) -> list[dict[str, Any]]:
        """Every job ever created, oldest first, as the paid-job ledger reads it: who asked
        for it (``idempotencyKey``), what it cost and whether that was refunded."""
        out = []
        for job in self.jobs.values():
            status, _ = job.status_at(now, self.settings.progress_steps)
            refunded = status in ("FAILED", "CANCELLED")
            out.append({
                "id": job.id,
                "idempotencyKey": job.idempotency_key,
                "status": status,
                "cost": 0 if refunded else job.cost,
                "refunded": refunded,
                "expired": job.is_expired(now, self.settings.asset_ttl),
                "createdAt": iso_ms(job.created),
                "prompt": job.prompt,
                "seed": job.seed,
            })
        return out

    # -- account ------------------------------------------------------------------------------

    def me_json(self, api_key: str) -> dict[str, Any]:
        return {
            "user": {"id": USER_ID, "email": "sim@batchflux.invalid", "role": "OWNER"},
            "team": {"id": TEAM_ID, "name": "Simulated team", "credits": max(0, self.credits),
                     "plan": "simulated", "customerId": None},
            "apiKey": {"id": key_id(api_key), "name": "simulator key", "prefix": api_key[:8]},
        }

    def stats_json(self) -> dict[str, Any]:
        c = self.counters
        return {
            "jobs_created": c.jobs_created,
            "idempotent_replays": c.idempotent_replays,
            "rate_limited": c.rate_limited,
            "inflight": self.inflight,
            "peak_inflight": c.peak_inflight,
            "duplicate_jobs": c.duplicate_jobs,
            "credits_spent": c.credits_spent,
            "credits_refunded": c.credits_refunded,
            "credits_available": self.credits,
            "completed_jobs": c.completed_jobs,
            "failed_jobs": c.failed_jobs,
            "downloads": c.downloads,
            "uploads": c.uploads,
            "webhooks": {"delivered": c.webhooks_delivered, "failed": c.webhooks_failed,
                         "dropped": c.webhooks_dropped, "duplicated": c.webhooks_duplicated,
                         "delayed": c.webhooks_delayed, "attempts": c.webhook_attempts},
            "errors_injected": dict(c.errors_injected),
            "requests": {label: dict(by) for label, by in c.requests.items()},
        }
