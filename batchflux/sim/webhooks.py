"""Webhook deliveries: signing, payloads, and the sender task.

The sender runs in the app's lifespan (uvicorn starts it). In-process through
``httpx.ASGITransport`` lifespans do not run: enter ``app.router.lifespan_context(app)``
yourself to get deliveries, otherwise jobs keep ``webhookStatus: "pending"``.

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
        for attempt in range(settings.webhook_retries + 1):
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
                counters.webhooks_delivered += 1
                return True
        counters.webhooks_failed += 1
        return False
