"""The simulator's in-memory world: jobs, credits, idempotency, uploads, limiters, counters.

Job status is derived lazily from the clock at read time (see ``Job.status_at``); the only
bookkeeping done "when a job ends" (refunds, in-flight counts) happens in ``SimState.settle``,
which every request calls first and which costs O(1) unless jobs have just ended.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .faults import FaultPlan, TokenBucket
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
    """One generation job. Times are Unix seconds from the simulator's clock."""

    id: str
    api_key: str
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
    id: str
    api_key: str
    data: bytes
    content_type: str
    kind: str
    ext: str
    created: float
    expires: float


@dataclass(slots=True)
class IdempotencyEntry:
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


class SimState:
    """Everything the simulator remembers. One instance per app, in ``app.state.sim``."""

    def __init__(self, settings: SimSettings, *, clock: Clock = time.time) -> None:
        self.clock = clock
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        """Forget every job, upload and counter; credits back to the configured amount."""
        s = self.settings
        self.plan = FaultPlan(s.fault_seed)
        self.credits = s.credits
        self.jobs: dict[str, Job] = {}
        self.jobs_by_key: dict[str, list[Job]] = defaultdict(list)
        self.inflight_by_key: dict[str, dict[str, Job]] = defaultdict(dict)
        self.inflight = 0
        self._ending: list[tuple[float, str]] = []
        self.idempotency: dict[tuple[str, str], IdempotencyEntry] = {}
        # (key, body hash) -> the latest job with that body: a new job for the same body is a
        # duplicate (paid twice) unless that job ended FAILED/CANCELLED (refunded).
        self.seen_bodies: dict[tuple[str, str], Job] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.storm_started: float | None = None  # the first submit's time (storm_seconds)
        self.uploads: dict[str, Upload] = {}
        self.images = ImageCache(s.render_cache_size)
        self.webhook_jobs: dict[str, Job] = {}
        self.counters = Counters()

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
            self.credits = settings.credits

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
        if self.inflight_by_key[job.api_key].pop(job.id, None) is not None:
            self.inflight -= 1
        if failed:
            self.credits += job.cost
            self.counters.credits_refunded += job.cost
            self.counters.credits_spent -= job.cost
            self.counters.failed_jobs += 1
        else:
            self.counters.completed_jobs += 1

    def cancel(self, job: Job, now: float) -> None:
        """Test hook: the job turns CANCELLED now (refunded if it had not ended)."""
        if job.settled:
            return
        job.cancelled_at = now
        self._finish(job, failed=True)

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

    def inflight_wait(self, api_key: str, now: float) -> float | None:
        """None when under the in-flight cap, else seconds until the key's next job ends."""
        cap = self.settings.max_inflight
        running = self.inflight_by_key[api_key]
        if cap is None or len(running) < cap:
            return None
        return max(0.0, min(job.ends for job in running.values()) - now)

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, *, api_key: str, body: dict[str, Any], body_hash: str, now: float,
                   size: tuple[int, int], base_url: str,
                   idempotency_key: str | None = None) -> Job:
        s = self.settings
        fate = self.plan.job_fate(s)
        params = body.get("fluxParams", {})
        started = now + fate.queue_seconds
        job = Job(
            id=str(uuid.uuid4()),
            api_key=api_key,
            model=body["model"],
            body=body,
            created=now,
            started=started,
            ends=started + fate.run_seconds,
            error=fate.error,
            cost=s.cost_per_image,
            size=size,
            output_format=params.get("output_format", "webp"),
            quality=params.get("output_quality", 80),
            seed=params["seed"] if "seed" in params else self.plan._stream("seeds").randrange(2**31),
            base_url=base_url,
            idempotency_key=idempotency_key,
        )
        if "webhookUrl" in body:
            job.webhook_url = body["webhookUrl"]
            job.webhook_events = tuple(body.get("webhookEvents") or ("completed", "failed"))
            job.webhook_status = "pending"
            self.webhook_jobs[job.id] = job
        keyed = self.jobs_by_key[api_key]
        job.index = len(keyed)
        keyed.append(job)
        self.jobs[job.id] = job
        heapq.heappush(self._ending, (job.ends, job.id))
        self.inflight_by_key[api_key][job.id] = job
        self.inflight += 1
        self.credits -= job.cost
        c = self.counters
        c.jobs_created += 1
        c.credits_spent += job.cost
        c.peak_inflight = max(c.peak_inflight, self.inflight)
        earlier = self.seen_bodies.get((api_key, body_hash))
        if earlier is not None:
            earlier_status, _ = earlier.status_at(now, s.progress_steps)
            if earlier_status not in ("FAILED", "CANCELLED"):
                c.duplicate_jobs += 1
        self.seen_bodies[(api_key, body_hash)] = job
        return job

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
