"""Injected faults: 5xx, dropped connections, truncated and corrupt downloads, repeatability."""

from __future__ import annotations

import io

import anyio
import httpx
import pytest
from conftest import OasValidator, sim_client
from PIL import Image

from batchflux.sim import SimSettings

BODY = {"prompt": "chaos", "model": "flux-2-dev", "fluxParams": {"seed": 1}}


async def _outcomes(settings: SimSettings, count: int = 30) -> list[str]:
    outcomes = []
    async with sim_client(settings) as client:
        for seed in range(count):
            try:
                response = await client.post("/v2/images/generate",
                                             json={**BODY, "fluxParams": {"seed": seed}})
                outcomes.append(str(response.status_code))
            except httpx.RemoteProtocolError:
                outcomes.append("drop")
    return outcomes


async def test_faults_repeat_with_the_same_seed() -> None:
    settings = SimSettings(job_seconds=0.1, error_rate=0.3, drop_rate=0.2, fault_seed=7)
    first = await _outcomes(settings)
    assert first == await _outcomes(settings)
    assert {"202", "drop"} <= set(first) and {"500", "503"} & set(first)
    assert first != await _outcomes(SimSettings(job_seconds=0.1, error_rate=0.3, drop_rate=0.2,
                                                fault_seed=8))


async def test_injected_5xx_bodies_match_the_schema(oas: OasValidator) -> None:
    async with sim_client(SimSettings(error_rate=1.0)) as client:
        response = await client.post("/v2/images/generate", json=BODY)
        assert response.status_code in (500, 503)
        oas.check("ErrorResponse", response.json())
        stats = (await client.get("/_sim/stats")).json()
        assert stats["jobs_created"] == 0
        assert sum(stats["errors_injected"].values()) == 1


async def test_drop_after_create_loses_the_response_but_not_the_job(sim_mode: str) -> None:
    settings = SimSettings(job_seconds=0.1, drop_rate=1.0, drop_after_create_share=1.0)
    async with sim_client(settings, mode=sim_mode) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v2/images/generate", json=BODY,
                              headers={"Idempotency-Key": "lost-1"})
        await client.post("/_sim/settings", json={"drop_rate": 0.0})
        retry = await client.post("/v2/images/generate", json=BODY,
                                  headers={"Idempotency-Key": "lost-1"})
        assert retry.status_code == 202
        stats = (await client.get("/_sim/stats")).json()
        assert (stats["jobs_created"], stats["idempotent_replays"]) == (1, 1)
        assert stats["errors_injected"] == {"drop_after_create": 1}
        assert stats["requests"]["POST /v2/images/generate"] == {"dropped": 1, "202": 1}


async def test_drop_before_create_creates_nothing() -> None:
    settings = SimSettings(drop_rate=1.0, drop_after_create_share=0.0)
    async with sim_client(settings) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v2/images/generate", json=BODY)
        assert (await client.get("/_sim/stats")).json()["jobs_created"] == 0


async def _completed_url(client: httpx.AsyncClient) -> str:
    job_id = (await client.post("/v2/images/generate", json=BODY)).json()["jobId"]
    for _ in range(500):
        job = (await client.get(f"/v2/jobs/{job_id}")).json()
        if job["status"] == "COMPLETED":
            return str(job["result"]["images"][0])
        await anyio.sleep(0.02)
    raise AssertionError("job never completed")


async def test_truncated_download_is_a_protocol_error(sim_mode: str) -> None:
    settings = SimSettings(job_seconds=0.1, queue_seconds=0.0, truncate_rate=1.0,
                           render_mode="fast")
    async with sim_client(settings, mode=sim_mode) as client:
        url = await _completed_url(client)
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)


async def test_corrupt_download_arrives_whole_but_does_not_decode(sim_mode: str) -> None:
    settings = SimSettings(job_seconds=0.1, queue_seconds=0.0, corrupt_rate=1.0,
                           render_mode="fast")
    async with sim_client(settings, mode=sim_mode) as client:
        url = await _completed_url(client)
        response = await client.get(url)
        assert response.status_code == 200
        with pytest.raises(OSError), Image.open(io.BytesIO(response.content)) as image:
            image.load()


async def test_slow_download_still_delivers_every_byte() -> None:
    settings = SimSettings(job_seconds=0.1, queue_seconds=0.0, render_mode="fast",
                           download_bytes_per_second=200_000)
    async with sim_client(settings, mode="uvicorn") as client:
        url = await _completed_url(client)
        response = await client.get(url)
        assert Image.open(io.BytesIO(response.content)).size == (1024, 1024)
