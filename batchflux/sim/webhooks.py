"""Webhook deliveries: signing, payloads, and the sender task.

The sender runs in the app's lifespan (uvicorn starts it). In-process through
``httpx.ASGITransport`` lifespans do not run: enter ``app.router.lifespan_context(app)``
yourself to get deliveries, otherwise jobs keep ``webhookStatus: "pending"``.

Faults, drawn per event from the fault RNG (``SimSettings.fault_seed``): an event may wait
``webhook_delay`` before its first attempt, be lost on the way (``webhook_drop_rate``: it never
arrives, and the sender counts it ``dropped``, as a provider whose request a proxy swallowed
would believe it delivered), or arrive twice (``webhook_dup_rate``). A receiver that answers
other than 2xx, or cannot be reached, is retried ``webhook_retries`` times with backoff, then
the job's ``webhookStatus`` is ``failed``.

Payloads are signed with the API key, which the simulator keeps in memory only: a job replayed
from a state directory gets its webhooks once a request with its key reached the new process.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from typing import Any

import anyio
import httpx

from .persist import SimStateError
from .settings import spread_bounds
from .state import Job, SimState, iso_ms


def signing_key(api_key: str) -> bytes:
    """The HMAC key: the raw 32-byte SHA-256 digest of the API key (as the official SDK)."""
    return hashlib.sha256(api_key.encode()).digest()


def sign(api_key: str, body: bytes) -> str:
    """The ``X-Webhook-Signature`` value for ``body``: ``sha256=<lowercase hex>``."""
    return "sha256=" + hmac.new(signing_key(api_key), body, hashlib.sha256).hexdigest()


def due_events(state: SimState, job: Job, now: float) -> list[dict[str, Any]]:
    """The payloads ``job`` owes its webhook at ``now`` (marks them as owed-no-more)."""
    status, progress = job.status_at(now, state.settings.progress_steps)
    events: list[dict[str, Any]] = []
    if status == "PROCESSING":
        if "progress" in job.webhook_events and progress != job.wh_last_progress:
            job.wh_last_progress = progress
            events.append({"event": "progress", "jobId": job.id, "status": status,
                           "progress": progress, "model": job.model})
        return events
    if status == "QUEUED":
        return events
    job.wh_final = True
    if status == "COMPLETED" and "completed" in job.webhook_events:
        events.append({
            "event": "completed", "jobId": job.id, "status": status, "progress": 100,
            "result": {"images": [f"{job.base_url}/cdn/images/{job.image_name}"]},
            "model": job.model, "creditCost": job.cost, "completedAt": iso_ms(job.ends),
        })
    elif status == "FAILED" and "failed" in job.webhook_events:
        events.append({
            "event": "failed", "jobId": job.id, "status": status, "error": job.error,
            "model": job.model, "creditCost": 0, "completedAt": iso_ms(job.ends),
        })
    return events


class WebhookSender:
    """Looks for due events every ``webhook_tick`` seconds and POSTs them, in order per job."""

    def __init__(self, state: SimState, *, transport: httpx.AsyncBaseTransport | None = None):
        self.state = state
        self._transport = transport

    async def run(self) -> None:
        """Deliver until cancelled."""
        async with httpx.AsyncClient(transport=self._transport) as client, \
                anyio.create_task_group() as tg:
            while True:
                self.tick(tg, client)
                await anyio.sleep(self.state.settings.webhook_tick)

    def tick(self, tg: anyio.abc.TaskGroup, client: httpx.AsyncClient) -> None:
        """Start a delivery for every job that owes events (and whose key is known)."""
        state = self.state
        now = state.clock()
        state.settle(now)
        for job in list(state.webhook_jobs.values()):
            if job.wh_busy or state.api_key_for(job.owner) is None:
                continue
            events = due_events(state, job, now)
            if events or job.wh_final:
                job.wh_busy = True
                tg.start_soon(self._deliver, client, job, events)

    async def _deliver(self, client: httpx.AsyncClient, job: Job,
                       events: list[dict[str, Any]]) -> None:
        try:
            for payload in events:
                if not await self._post(client, job, payload):
                    job.wh_failed = True
        finally:
            job.wh_busy = False
            if job.wh_final:
                # A released state directory keeps the job pending there.
                with contextlib.suppress(SimStateError):
                    self.state.settle_webhook(job, "failed" if job.wh_failed else "delivered")

    async def _post(self, client: httpx.AsyncClient, job: Job, payload: dict[str, Any]) -> bool:
        settings = self.state.settings
        counters = self.state.counters
        plan = self.state.plan
        drop = plan.chance("webhook:drop", settings.webhook_drop_rate)
        duplicate = plan.chance("webhook:dup", settings.webhook_dup_rate)
        low, high = spread_bounds(settings.webhook_delay)
        wait = plan.uniform("webhook:delay", low, high) if high > 0 else 0.0
        if wait > 0:
            counters.webhooks_delayed += 1
            await anyio.sleep(wait)
        if drop:
            counters.webhooks_dropped += 1
            return True
        delivered = await self._attempts(client, job, payload)
        if delivered and duplicate:
            counters.webhooks_duplicated += 1
            await anyio.sleep(settings.webhook_backoff)
            await self._attempts(client, job, payload, retries=0, count=False)
        return delivered

    async def _attempts(self, client: httpx.AsyncClient, job: Job, payload: dict[str, Any], *,
                        retries: int | None = None, count: bool = True) -> bool:
        """POST ``payload`` until a 2xx, retrying with backoff; True when one came."""
        settings = self.state.settings
        counters = self.state.counters
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        api_key = self.state.api_key_for(job.owner)
        assert api_key is not None  # tick() waits for it
        headers = {
            "Content-Type": "application/json",
            "X-Webhook-Event": payload["event"],
            "X-Webhook-Signature": sign(api_key, body),
        }
        delay = settings.webhook_backoff
        assert job.webhook_url is not None
        retries = settings.webhook_retries if retries is None else retries
        for attempt in range(retries + 1):
            if attempt:
                await anyio.sleep(delay)
                delay *= 2
            counters.webhook_attempts += 1
            try:
                response = await client.post(job.webhook_url, content=body, headers=headers,
                                             timeout=settings.webhook_timeout)
            except httpx.HTTPError:
                continue
            if 200 <= response.status_code < 300:
                counters.webhooks_delivered += count
                return True
        counters.webhooks_failed += count
        return False
