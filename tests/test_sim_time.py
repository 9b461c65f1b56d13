"""Time-driven behaviour of the simulator on an injected clock (no sleeping)."""

from __future__ import annotations

import httpx
from conftest import OasValidator, sim_client

from batchflux.sim import SimSettings

BODY = {"prompt": "a lighthouse at dusk", "model": "flux-2-dev", "fluxParams": {"seed": 1}}


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _job(client: httpx.AsyncClient, job_id: str) -> dict:
    return (await client.get(f"/v2/jobs/{job_id}")).json()


async def test_progress_rises_linearly_then_completes(oas: OasValidator) -> None:
    clock = FakeClock()
    settings = SimSettings(job_seconds=(10.0, 10.0), queue_seconds=(1.0, 1.0), progress_steps=100,
                           render_mode="fast")
    async with sim_client(settings, clock=clock) as client:
        job_id = (await client.post("/v2/images/generate", json=BODY)).json()["jobId"]
        job = await _job(client, job_id)
        assert (job["status"], job["progress"], job["result"]) == ("QUEUED", 0, None)
        seen = []
        for _ in range(9):
            clock.advance(1.0)
            job = await _job(client, job_id)
            oas.check("Job", job)
            assert job["status"] == "PROCESSING"
            seen.append(job["progress"])
        assert seen == [0, 10, 20, 30, 40, 50, 60, 70, 80]
        clock.advance(2.0)
        job = await _job(client, job_id)
        assert (job["status"], job["progress"]) == ("COMPLETED", 100)


async def test_failed_job_is_refunded(oas: OasValidator) -> None:
    clock = FakeClock()
    settings = SimSettings(job_seconds=(5.0, 5.0), queue_seconds=(0.0, 0.0), fail_rate=1.0,
                           fail_capacity_share=1.0, credits=10, cost_per_image=4)
    async with sim_client(settings, clock=clock) as client:
        job_id = (await client.post("/v2/images/generate", json=BODY)).json()["jobId"]
        assert (await _job(client, job_id))["creditCost"] == 4
        assert (await client.get("/v2/me")).json()["team"]["credits"] == 6
        clock.advance(10.0)
        job = await _job(client, job_id)
        oas.check("Job", job)
        assert job["status"] == "FAILED" and job["progress"] == 0 and job["creditCost"] == 0
        assert job["error"] == "No available capacity — please retry shortly"
        assert job["completedAt"] is not None and job["result"] is None
        assert (await client.get("/v2/me")).json()["team"]["credits"] == 10
        stats = (await client.get("/_sim/stats")).json()
        assert (stats["failed_jobs"], stats["credits_spent"], stats["inflight"]) == (1, 0, 0)


async def test_content_policy_failures_use_the_documented_text() -> None:
    clock = FakeClock()
    settings = SimSettings(job_seconds=1.0, fail_rate=1.0, fail_capacity_share=0.0)
    async with sim_client(settings, clock=clock) as client:
        job_id = (await client.post("/v2/images/generate", json=BODY)).json()["jobId"]
        clock.advance(60)
        assert (await _job(client, job_id))["error"] == (
            "Provider returned an error: content policy violation")


async def test_assets_expire_after_the_ttl() -> None:
    clock = FakeClock()
    settings = SimSettings(job_seconds=1.0, queue_seconds=0.0, asset_ttl=3600, render_mode="fast")
    async with sim_client(settings, clock=clock) as client:
        job_id = (await client.post("/v2/images/generate", json=BODY)).json()["jobId"]
        clock.advance(10)
        job = await _job(client, job_id)
        url = job["result"]["images"][0]
        assert job["expired"] is False and (await client.get(url)).status_code == 200
        clock.advance(3600)
        job = await _job(client, job_id)
        assert job["expired"] is True
        gone = await client.get(url)
        assert (gone.status_code, gone.json()) == (404, {"error": "Not found"})


async def test_uploads_expire_after_their_ttl() -> None:
    clock = FakeClock()
    async with sim_client(SimSettings(upload_ttl=60), clock=clock) as client:
        upload = (await client.post("/v2/uploads",
                                    files={"file": ("a.gif", b"GIF89a" + b"\0" * 10)})).json()
        assert (await client.get(upload["url"])).status_code == 200
        clock.advance(61)
        assert (await client.get(upload["url"])).status_code == 404


async def test_token_bucket_refills_with_time() -> None:
    clock = FakeClock()
    async with sim_client(SimSettings(rps=0.25, burst=1), clock=clock) as client:
        bodies = [{**BODY, "fluxParams": {"seed": s}} for s in range(4)]
        assert (await client.post("/v2/images/generate", json=bodies[0])).status_code == 202
        limited = await client.post("/v2/images/generate", json=bodies[1])
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "4")
        clock.advance(2.5)
        limited = await client.post("/v2/images/generate", json=bodies[1])
        assert limited.headers["Retry-After"] == "2"
        clock.advance(2.0)
        assert (await client.post("/v2/images/generate", json=bodies[1])).status_code == 202


async def test_inflight_retry_after_points_at_the_next_completion() -> None:
    clock = FakeClock()
    settings = SimSettings(job_seconds=(20.0, 20.0), queue_seconds=(0.0, 0.0), max_inflight=1)
    async with sim_client(settings, clock=clock) as client:
        await client.post("/v2/images/generate", json=BODY)
        clock.advance(5)
        capped = await client.post("/v2/images/generate", json={**BODY, "prompt": "b"})
        assert (capped.status_code, capped.headers["Retry-After"]) == (429, "15")
        clock.advance(15)
        assert (await client.post("/v2/images/generate",
                                  json={**BODY, "prompt": "b"})).status_code == 202


async def test_idempotent_replay_returns_current_status_and_expires() -> None:
    clock = FakeClock()
    settings = SimSettings(job_seconds=(2.0, 2.0), queue_seconds=(0.0, 0.0), idempotency_ttl=100)
    async with sim_client(settings, clock=clock) as client:
        headers = {"Idempotency-Key": "abc"}
        first = (await client.post("/v2/images/generate", json=BODY, headers=headers)).json()
        clock.advance(5)
        replay = (await client.post("/v2/images/generate", json=BODY, headers=headers)).json()
        assert replay == {"jobId": first["jobId"], "status": "COMPLETED"}
        clock.advance(100)
        later = (await client.post("/v2/images/generate", json=BODY, headers=headers)).json()
        assert later["jobId"] != first["jobId"]


async def test_cancel_hook_makes_a_terminal_cancelled_job(oas: OasValidator) -> None:
    clock = FakeClock()
    async with sim_client(SimSettings(job_seconds=30.0), clock=clock) as client:
        job_id = (await client.post("/v2/images/generate", json=BODY)).json()["jobId"]
        clock.advance(1)
        await client.post(f"/_sim/jobs/{job_id}/cancel")
        job = await _job(client, job_id)
        oas.check("Job", job)
        assert (job["status"], job["creditCost"]) == ("CANCELLED", 0)


async def test_rerunning_a_refunded_failed_job_is_not_a_duplicate() -> None:
    clock = FakeClock()
    settings = SimSettings(job_seconds=1.0, fail_rate=1.0)
    async with sim_client(settings, clock=clock) as client:
        await client.post("/v2/images/generate", json=BODY)
        clock.advance(60)
        await client.post("/_sim/settings", json={"fail_rate": 0.0})
        await client.post("/v2/images/generate", json=BODY)  # a retry after FAILED: fine
        await client.post("/v2/images/generate", json=BODY)  # a second paid copy: duplicate
        assert (await client.get("/_sim/stats")).json()["duplicate_jobs"] == 1
