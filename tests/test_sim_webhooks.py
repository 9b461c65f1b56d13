"""Webhook deliveries to a real loopback receiver, signatures checked independently."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from conftest import API_KEY, OasValidator, sim_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from batchflux.sim import SimSettings, serve_in_thread

FAST = {"job_seconds": 0.3, "queue_seconds": 0.02, "render_mode": "fast", "progress_steps": 5,
            "webhook_tick": 0.01, "webhook_backoff": 0.01}


class Receiver:
    """Records every POST; answers with ``status``."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.calls: list[tuple[dict[str, str], bytes]] = []

        async def hook(request: Request) -> Response:
            self.calls.append((dict(request.headers), await request.body()))
            return Response(status_code=self.status)

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.calls]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()
    with serve_in_thread(app=rec.app) as base_url:
        yield rec, f"{base_url}/hook"


def verify(api_key: str, headers: dict[str, str], body: bytes) -> bool:
    secret = hashlib.sha256(api_key.encode()).digest()
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["x-webhook-signature"])


async def _wait_webhook_status(client: httpx.AsyncClient, job_id: str,
                               oas: OasValidator) -> dict[str, Any]:
    for _ in range(500):
        job = (await client.get(f"/v2/jobs/{job_id}")).json()
        oas.check("Job", job)
        if job["webhookStatus"] in ("delivered", "failed"):
            return job
        await anyio.sleep(0.02)
    raise AssertionError("webhook never settled")


async def test_progress_and_completed_events_are_signed(receiver: tuple[Receiver, str],
                                                        oas: OasValidator) -> None:
    rec, url = receiver
    async with sim_client(SimSettings(**FAST), mode="uvicorn") as client:
        body = {"prompt": "hook me", "model": "flux-2-dev", "webhookUrl": url,
                "webhookEvents": ["progress", "completed"]}
        job_id = (await client.post("/v2/images/generate", json=body)).json()["jobId"]
        assert (await client.get(f"/v2/jobs/{job_id}")).json()["webhookStatus"] == "pending"
        job = await _wait_webhook_status(client, job_id, oas)
        assert job["webhookStatus"] == "delivered"
    payloads = rec.payloads()
    assert [p["event"] for p in payloads][-1] == "completed"
    progress = [p["progress"] for p in payloads if p["event"] == "progress"]
    assert progress and progress == sorted(set(progress))
    completed = payloads[-1]
    assert completed["jobId"] == job_id and completed["result"] == job["result"]
    assert completed["status"] == "COMPLETED" and completed["creditCost"] == 2
    for headers, raw in rec.calls:
        assert verify(API_KEY, headers, raw)
        assert headers["content-type"] == "application/json"
        assert headers["x-webhook-event"] == json.loads(raw)["event"]
        assert not verify("afk_some_other_key", headers, raw)


async def test_default_events_are_completed_and_failed_only(receiver: tuple[Receiver, str],
                                                            oas: OasValidator) -> None:
    rec, url = receiver
    settings = SimSettings(**{**FAST, "fail_rate": 1.0, "fail_capacity_share": 0.0})
    async with sim_client(settings, mode="uvicorn") as client:
        body = {"prompt": "nope", "model": "flux-2-dev", "webhookUrl": url}
        job_id = (await client.post("/v2/images/generate", json=body)).json()["jobId"]
        await _wait_webhook_status(client, job_id, oas)
    assert [p["event"] for p in rec.payloads()] == ["failed"]
    failed = rec.payloads()[0]
    assert failed["error"] == "Provider returned an error: content policy violation"
    assert verify(API_KEY, *rec.calls[0])


async def test_failing_receiver_is_retried_then_marked_failed(receiver: tuple[Receiver, str],
                                                              oas: OasValidator) -> None:
    rec, url = receiver
    rec.status = 500
    async with sim_client(SimSettings(**FAST, webhook_retries=2), mode="uvicorn") as client:
        body = {"prompt": "down", "model": "flux-2-dev", "webhookUrl": url}
        job_id = (await client.post("/v2/images/generate", json=body)).json()["jobId"]
        job = await _wait_webhook_status(client, job_id, oas)
        assert job["webhookStatus"] == "failed"
        stats = (await client.get("/_sim/stats")).json()
    assert len(rec.calls) == 3
    assert stats["webhooks"] == {"delivered": 0, "failed": 1, "dropped": 0, "duplicated": 0,
                                 "delayed": 0, "attempts": 3}


async def test_in_process_deliveries_run_inside_the_lifespan(receiver: tuple[Receiver, str],
                                                             oas: OasValidator) -> None:
    rec, url = receiver
    async with sim_client(SimSettings(**FAST)) as client:
        app = client.sim_app  # type: ignore[attr-defined]
        async with app.router.lifespan_context(app):
            body = {"prompt": "in process", "model": "flux-2-dev", "webhookUrl": url}
            job_id = (await client.post("/v2/images/generate", json=body)).json()["jobId"]
            job = await _wait_webhook_status(client, job_id, oas)
    assert job["webhookStatus"] == "delivered"
    assert [p["event"] for p in rec.payloads()] == ["completed"]


# -- faults: lost, repeated and late events -------------------------------------------------


async def _settle_all(client: httpx.AsyncClient, bodies: list[dict[str, Any]],
                      oas: OasValidator) -> list[dict[str, Any]]:
    ids = [(await client.post("/v2/images/generate", json=b)).json()["jobId"] for b in bodies]
    return [await _wait_webhook_status(client, job_id, oas) for job_id in ids]


async def test_dropped_events_never_arrive_and_the_sender_believes_them_delivered(
        receiver: tuple[Receiver, str], oas: OasValidator) -> None:
    rec, url = receiver
    async with sim_client(SimSettings(**FAST, webhook_drop_rate=1.0), mode="uvicorn") as client:
        jobs = await _settle_all(client, [{"prompt": f"lost {i}", "model": "flux-2-dev",
                                           "webhookUrl": url} for i in range(3)], oas)
        stats = (await client.get("/_sim/stats")).json()
    assert rec.calls == []
    assert [job["webhookStatus"] for job in jobs] == ["delivered"] * 3
    assert stats["webhooks"]["dropped"] == 3
    assert stats["webhooks"]["delivered"] == stats["webhooks"]["attempts"] == 0


async def test_duplicated_events_arrive_twice_byte_for_byte(receiver: tuple[Receiver, str],
                                                            oas: OasValidator) -> None:
    rec, url = receiver
    async with sim_client(SimSettings(**FAST, webhook_dup_rate=1.0), mode="uvicorn") as client:
        await _settle_all(client, [{"prompt": "twice", "model": "flux-2-dev",
                                    "webhookUrl": url}], oas)
        for _ in range(500):  # the copy follows the settled status by webhook_backoff
            if len(rec.calls) == 2:
                break
            await anyio.sleep(0.02)
        stats = (await client.get("/_sim/stats")).json()
    assert len(rec.calls) == 2
    (first_headers, first), (second_headers, second) = rec.calls
    assert first == second and verify(API_KEY, second_headers, second)
    assert first_headers["x-webhook-signature"] == second_headers["x-webhook-signature"]
    assert stats["webhooks"]["duplicated"] == 1 and stats["webhooks"]["delivered"] == 1
    assert stats["webhooks"]["attempts"] == 2


async def test_delayed_events_still_arrive_and_are_counted(receiver: tuple[Receiver, str],
                                                           oas: OasValidator) -> None:
    rec, url = receiver
    settings = SimSettings(**FAST, webhook_delay=(0.1, 0.2))
    async with sim_client(settings, mode="uvicorn") as client:
        jobs = await _settle_all(client, [{"prompt": f"late {i}", "model": "flux-2-dev",
                                           "webhookUrl": url} for i in range(2)], oas)
        stats = (await client.get("/_sim/stats")).json()
    assert [job["webhookStatus"] for job in jobs] == ["delivered"] * 2
    assert stats["webhooks"]["delayed"] == 2 and stats["webhooks"]["delivered"] == 2
    assert sorted(p["jobId"] for p in rec.payloads()) == sorted(job["id"] for job in jobs)


def test_webhook_fault_settings_are_checked_and_read_from_flags() -> None:
    import argparse

    from batchflux.sim.serve import add_arguments, settings_from_args
    from batchflux.sim.settings import settings_with

    with pytest.raises(ValueError, match="webhook_drop_rate"):
        SimSettings(webhook_drop_rate=1.5)
    with pytest.raises(ValueError, match="webhook_delay"):
        SimSettings(webhook_delay=(2.0, 1.0))
    assert settings_with(SimSettings(), {"webhook_delay": "1-3"}).webhook_delay == (1.0, 3.0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(
        ["--webhook-drop-rate", "0.3", "--webhook-dup-rate", "0.2", "--webhook-delay", "2-4"]))
    assert (settings.webhook_drop_rate, settings.webhook_dup_rate,
            settings.webhook_delay) == (0.3, 0.2, (2.0, 4.0))
