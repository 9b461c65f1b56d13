"""The simulator's HTTP contract, run in-process and over real loopback HTTP."""

from __future__ import annotations

import io
import re
from typing import Any

import anyio
import httpx
import pytest
from conftest import API_KEY, OasValidator, sim_client
from PIL import Image

from batchflux.sim import SimSettings

FAST = {"job_seconds": 0.2, "queue_seconds": 0.02, "render_mode": "fast"}
BODY = {"prompt": "a ceramic mug, product photography", "model": "flux-2-dev",
        "fluxParams": {"aspect_ratio": "1:1", "seed": 7}}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def wait_terminal(client: httpx.AsyncClient, job_id: str,
                        oas: OasValidator) -> dict[str, Any]:
    for _ in range(500):
        response = await client.get(f"/v2/jobs/{job_id}")
        assert response.status_code == 200
        job = response.json()
        oas.check("Job", job)
        if job["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return job
        await anyio.sleep(0.02)
    raise AssertionError("job never finished")


async def test_auth_errors_have_the_documented_texts(sim_mode: str, oas: OasValidator) -> None:
    settings = SimSettings(**FAST, api_keys=("afk_good",), inactive_keys=("afk_sleepy",))
    async with sim_client(settings, mode=sim_mode, api_key=None) as client:
        cases = [({}, 401, "API key is required"),
                 ({"X-API-Key": "afk_unknown"}, 401, "Invalid API key"),
                 ({"X-API-Key": "afk_sleepy"}, 403, "API key is inactive")]
        for headers, status, text in cases:
            for request in (client.post("/v2/images/generate", json=BODY, headers=headers),
                            client.get("/v2/me", headers=headers)):
                response = await request
                assert (response.status_code, response.json()) == (status, {"error": text})
                oas.check("ErrorResponse", response.json())
                assert response.headers["x-request-id"]
        ok = await client.get("/v2/me", headers={"X-API-Key": "afk_good"})
        assert ok.status_code == 200


async def test_any_afk_key_is_valid_by_default() -> None:
    async with sim_client(SimSettings(**FAST), api_key="afk_whatever") as client:
        assert (await client.get("/v2/me")).status_code == 200
        bad = await client.get("/v2/me", headers={"X-API-Key": "sk_live_x"})
        assert bad.json() == {"error": "Invalid API key"}


BAD_BODIES = [
    ({"model": "flux-2-dev"}, ["prompt"]),
    ({"prompt": "", "model": "flux-2-dev"}, ["prompt"]),
    ({"prompt": "x" * 2001, "model": "flux-2-dev"}, ["prompt"]),
    ({"prompt": "a", "model": "flux-9"}, ["model"]),
    ({"prompt": "a", "model": "flux-2-dev", "colour": "red"}, ["colour"]),
    ({"prompt": "a", "model": "flux-2-dev", "seedreamParams": {}}, ["seedreamParams"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"sharpness": 3}},
     ["fluxParams.sharpness"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"aspect_ratio": "wide"}},
     ["fluxParams.aspect_ratio"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"aspect_ratio": "0:1"}},
     ["fluxParams.aspect_ratio"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"aspect_ratio": "match_input_image"}},
     ["fluxParams.aspect_ratio"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"aspect_ratio": "custom", "width": 512}},
     ["fluxParams.height"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"width": 512, "height": 512}},
     ["fluxParams.width", "fluxParams.height"]),
    ({"prompt": "a", "model": "flux-2-dev",
      "fluxParams": {"aspect_ratio": "custom", "width": 100, "height": 4096}},
     ["fluxParams.width", "fluxParams.height"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"output_format": "gif"}},
     ["fluxParams.output_format"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"output_quality": 101}},
     ["fluxParams.output_quality"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"output_quality": 8.5}},
     ["fluxParams.output_quality"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"seed": "42"}}, ["fluxParams.seed"]),
    ({"prompt": "a", "model": "flux-2-dev", "fluxParams": {"go_fast": "yes"}},
     ["fluxParams.go_fast"]),
    ({"prompt": "a", "model": "flux-2-dev",
      "fluxParams": {"input_images": [f"https://x.test/{i}.png" for i in range(6)]}},
     ["fluxParams.input_images"]),
    ({"prompt": "a", "model": "flux-2-dev",
      "fluxParams": {"input_images": ["data:image/png;base64,AA"]}},
     ["fluxParams.input_images.0"]),
    ({"prompt": "a", "model": "flux-2-dev", "webhookUrl": "not a url"}, ["webhookUrl"]),
    ({"prompt": "a", "model": "flux-2-dev", "webhookUrl": "https://h.test/", "webhookEvents": []},
     ["webhookEvents"]),
    ({"prompt": "a", "model": "flux-2-dev", "webhookUrl": "https://h.test/",
      "webhookEvents": ["done"]}, ["webhookEvents.0"]),
]


async def test_invalid_bodies_get_400_with_every_detail(sim_mode: str, oas: OasValidator) -> None:
    async with sim_client(SimSettings(**FAST), mode=sim_mode) as client:
        for body, paths in BAD_BODIES:
            response = await client.post("/v2/images/generate", json=body)
            assert response.status_code == 400, body
            data = response.json()
            oas.check("ValidationError", data)
            assert data["error"] == "Validation failed"
            assert sorted(data["details"]) == sorted(paths), body
        everything = {"prompt": "", "model": "nope", "extra": 1,
                      "fluxParams": {"output_format": "bmp", "seed": 1.5}}
        details = (await client.post("/v2/images/generate", json=everything)).json()["details"]
        assert set(details) == {"prompt", "model", "extra", "fluxParams.output_format",
                                "fluxParams.seed"}
        stats = (await client.get("/_sim/stats")).json()
        assert stats["jobs_created"] == 0


@pytest.mark.parametrize(("params", "size", "pil_format"), [
    ({"aspect_ratio": "16:9", "output_format": "jpg", "output_quality": 70}, (1360, 768), "JPEG"),
    ({"aspect_ratio": "custom", "width": 1000, "height": 500, "output_format": "png"},
     (992, 496), "PNG"),
    ({}, (1024, 1024), "WEBP"),
])
async def test_completed_job_serves_a_real_image(sim_mode: str, oas: OasValidator,
                                                 params: dict[str, Any], size: tuple[int, int],
                                                 pil_format: str) -> None:
    settings = SimSettings(**{**FAST, "render_mode": "full"})
    async with sim_client(settings, mode=sim_mode) as client:
        body = {"prompt": "a red bicycle", "model": "flux-2-dev",
                "fluxParams": {**params, "seed": 3}}
        response = await client.post("/v2/images/generate", json=body)
        assert response.status_code == 202
        accepted = response.json()
        oas.check("JobAccepted", accepted)
        assert accepted["status"] == "QUEUED"
        job = await wait_terminal(client, accepted["jobId"], oas)
        assert job["status"] == "COMPLETED" and job["progress"] == 100
        assert ISO_MS.match(job["createdAt"]) and ISO_MS.match(job["completedAt"])
        assert job["expired"] is False and job["creditCost"] == 2
        url = job["result"]["images"][0]
        assert url.startswith(str(client.base_url).rstrip("/") + "/cdn/images/")
        image = await client.get(url)
        assert image.status_code == 200
        with Image.open(io.BytesIO(image.content)) as picture:
            picture.load()
            assert (picture.size, picture.format) == (size, pil_format)
        again = await client.get(url)
        assert again.content == image.content


async def test_idempotency_replays_conflicts_and_limits(sim_mode: str, oas: OasValidator) -> None:
    async with sim_client(SimSettings(**FAST), mode=sim_mode) as client:
        first = await client.post("/v2/images/generate", json=BODY,
                                  headers={"Idempotency-Key": "item-1"})
        replay = await client.post("/v2/images/generate", json=BODY,
                                   headers={"Idempotency-Key": "item-1"})
        assert first.status_code == replay.status_code == 202
        oas.check("JobAccepted", replay.json())
        assert replay.json()["jobId"] == first.json()["jobId"]

        other = {**BODY, "prompt": "something else"}
        conflict = await client.post("/v2/images/generate", json=other,
                                     headers={"Idempotency-Key": "item-1"})
        assert conflict.status_code == 409
        assert conflict.json() == {"error": "Idempotency key reused with a different request body"}

        too_long = await client.post("/v2/images/generate", json=BODY,
                                     headers={"Idempotency-Key": "k" * 256})
        assert too_long.status_code == 400
        oas.check("ValidationError", too_long.json())

        # A failed validation is not remembered: the key stays free for a valid body.
        await client.post("/v2/images/generate", json={"prompt": ""},
                          headers={"Idempotency-Key": "item-2"})
        fresh = await client.post("/v2/images/generate", json=other,
                                  headers={"Idempotency-Key": "item-2"})
        assert fresh.status_code == 202

        # Same key from another API key is another scope.
        elsewhere = await client.post("/v2/images/generate", json=BODY,
                                      headers={"Idempotency-Key": "item-1",
                                               "X-API-Key": "afk_second_key"})
        assert elsewhere.json()["jobId"] != first.json()["jobId"]

        stats = (await client.get("/_sim/stats")).json()
        assert stats["idempotent_replays"] == 1
        assert stats["jobs_created"] == 3
        assert stats["duplicate_jobs"] == 0
        assert stats["credits_spent"] == 6

        await client.post("/v2/images/generate", json=BODY)  # same body, no key: a duplicate
        assert (await client.get("/_sim/stats")).json()["duplicate_jobs"] == 1


async def test_credits_are_debited_and_402_reports_the_numbers(sim_mode: str,
                                                               oas: OasValidator) -> None:
    settings = SimSettings(**FAST, credits=5, cost_per_image=2)
    async with sim_client(settings, mode=sim_mode) as client:
        for seed in (1, 2):
            body = {**BODY, "fluxParams": {"seed": seed}}
            assert (await client.post("/v2/images/generate", json=body)).status_code == 202
        short = await client.post("/v2/images/generate", json=BODY)
        assert short.status_code == 402
        oas.check("InsufficientCredits", short.json())
        assert short.json() == {"error": "Insufficient credits", "creditsRequired": 2,
                                "creditsAvailable": 1}
        me = (await client.get("/v2/me")).json()
        oas.check("Me", me)
        assert me["team"]["credits"] == 1
        assert API_KEY not in str(me) and me["apiKey"]["prefix"] == API_KEY[:8]


async def test_job_lookup_errors(sim_mode: str, oas: OasValidator) -> None:
    async with sim_client(SimSettings(**FAST), mode=sim_mode) as client:
        bad = await client.get("/v2/jobs/not-a-uuid")
        assert bad.status_code == 400
        oas.check("ErrorResponse", bad.json())
        missing = await client.get("/v2/jobs/00000000-0000-4000-8000-000000000000")
        assert (missing.status_code, missing.json()) == (404, {"error": "Job not found"})
        job_id = (await client.post("/v2/images/generate", json=BODY)).json()["jobId"]
        foreign = await client.get(f"/v2/jobs/{job_id}", headers={"X-API-Key": "afk_other"})
        assert (foreign.status_code, foreign.json()) == (404, {"error": "Job not found"})


async def test_rps_limit_answers_429_with_retry_after(sim_mode: str, oas: OasValidator) -> None:
    async with sim_client(SimSettings(**FAST, rps=0.5, burst=2), mode=sim_mode) as client:
        statuses = []
        for seed in range(3):
            response = await client.post("/v2/images/generate",
                                         json={**BODY, "fluxParams": {"seed": seed}})
            statuses.append(response.status_code)
        assert statuses == [202, 202, 429]
        assert response.json() == {"error": "Rate limit exceeded"}
        oas.check("ErrorResponse", response.json())
        assert int(response.headers["Retry-After"]) >= 1
        assert (await client.get("/_sim/stats")).json()["rate_limited"] == 1


async def test_inflight_cap_answers_429_with_retry_after(sim_mode: str) -> None:
    settings = SimSettings(job_seconds=30.0, queue_seconds=0.0, render_mode="fast", max_inflight=2)
    async with sim_client(settings, mode=sim_mode) as client:
        for seed in range(2):
            ok = await client.post("/v2/images/generate",
                                   json={**BODY, "fluxParams": {"seed": seed}})
            assert ok.status_code == 202
        capped = await client.post("/v2/images/generate", json=BODY)
        assert capped.status_code == 429
        assert 1 <= int(capped.headers["Retry-After"]) <= 46
        other_key = await client.post("/v2/images/generate", json=BODY,
                                      headers={"X-API-Key": "afk_other"})
        assert other_key.status_code == 202
        stats = (await client.get("/_sim/stats")).json()
        assert (stats["inflight"], stats["peak_inflight"], stats["rate_limited"]) == (3, 3, 1)


async def test_models_catalog_is_public(sim_mode: str, oas: OasValidator) -> None:
    settings = SimSettings(**FAST, cost_per_image=3)
    async with sim_client(settings, mode=sim_mode, api_key=None) as client:
        response = await client.get("/v2/models", params={"modality": "image"})
        assert response.status_code == 200
        oas.check("ModelCatalog", response.json())
        dev = next(m for m in response.json()["models"] if m["id"] == "flux-2-dev")
        assert (dev["costMin"], dev["costMax"], dev["pricingMode"]) == (3, 3, "flat")
        bad = await client.get("/v2/models", params={"modality": "smell"})
        assert bad.status_code == 400
        oas.check("ValidationError", bad.json())


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_upload_then_match_input_image(sim_mode: str, oas: OasValidator) -> None:
    async with sim_client(SimSettings(**FAST), mode=sim_mode) as client:
        data = _png((640, 480))
        response = await client.post("/v2/uploads", files={"file": ("ref.txt", data, "text/plain")})
        assert response.status_code == 201
        upload = response.json()
        oas.check("Upload", upload)
        assert (upload["kind"], upload["contentType"], upload["byteSize"]) == (
            "image", "image/png", len(data))
        assert (await client.get(upload["url"])).content == data

        body = {"prompt": "same framing", "model": "flux-2-dev",
                "fluxParams": {"aspect_ratio": "match_input_image", "output_format": "png",
                               "input_images": [upload["url"]], "seed": 5}}
        job_id = (await client.post("/v2/images/generate", json=body)).json()["jobId"]
        job = await wait_terminal(client, job_id, oas)
        image = await client.get(job["result"]["images"][0])
        assert Image.open(io.BytesIO(image.content)).size == (640, 480)

        foreign = {**body, "fluxParams": {**body["fluxParams"],
                                          "input_images": ["https://elsewhere.test/a.png"]}}
        job = await wait_terminal(client, (await client.post("/v2/images/generate",
                                                             json=foreign)).json()["jobId"], oas)
        image = await client.get(job["result"]["images"][0])
        assert Image.open(io.BytesIO(image.content)).size == (1024, 1024)


async def test_upload_rejects_missing_bad_and_oversized_files(sim_mode: str,
                                                              oas: OasValidator) -> None:
    async with sim_client(SimSettings(**FAST, max_upload_bytes=1000), mode=sim_mode) as client:
        cases = [
            {"data": {"other": "x"}},
            {"files": {"file": ("a.png", b"just some text", "image/png")}},
            {"files": {"file": ("big.png", _png((400, 400)) + b"\0" * 2000, "image/png")}},
        ]
        for kwargs in cases:
            response = await client.post("/v2/uploads", **kwargs)
            assert response.status_code == 400, kwargs
            oas.check("ValidationError", response.json())
        gif = await client.post("/v2/uploads", files={"file": ("a", b"GIF89a" + b"\0" * 20)})
        assert gif.json()["contentType"] == "image/gif"


async def test_job_list_pages_newest_first(sim_mode: str, oas: OasValidator) -> None:
    async with sim_client(SimSettings(**FAST), mode=sim_mode) as client:
        ids = []
        for seed in range(5):
            response = await client.post("/v2/images/generate",
                                         json={**BODY, "fluxParams": {"seed": seed}})
            ids.append(response.json()["jobId"])
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/v2/jobs", params=params)).json()
            oas.check("JobList", page)
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["nextCursor"]
            if not page["hasMore"]:
                break
        assert seen == ids[::-1]


async def test_stats_count_requests_by_route_and_status(sim_mode: str) -> None:
    async with sim_client(SimSettings(**FAST), mode=sim_mode) as client:
        await client.post("/v2/images/generate", json=BODY)
        await client.post("/v2/images/generate", json={"prompt": ""})
        await client.get("/v2/nope")
        stats = (await client.get("/_sim/stats")).json()
        assert stats["requests"]["POST /v2/images/generate"] == {"202": 1, "400": 1}
        assert stats["requests"]["other"] == {"404": 1}
        for name in ("jobs_created", "idempotent_replays", "rate_limited", "peak_inflight",
                     "inflight", "duplicate_jobs", "credits_spent", "failed_jobs", "downloads",
                     "uploads", "errors_injected"):
            assert name in stats


async def test_settings_can_change_at_runtime_and_reset(sim_mode: str) -> None:
    async with sim_client(SimSettings(**FAST), mode=sim_mode) as client:
        await client.post("/v2/images/generate", json=BODY)
        changed = await client.post("/_sim/settings", json={"credits": 1, "api_keys": ["afk_z"]})
        assert changed.status_code == 200 and changed.json()["api_keys"] == ["afk_z"]
        assert (await client.get("/v2/me")).json() == {"error": "Invalid API key"}
        bad = await client.post("/_sim/settings", json={"warp_speed": True})
        assert bad.status_code == 400 and "warp_speed" in bad.json()["error"]
        await client.post("/_sim/settings", json={"api_keys": []})
        assert (await client.post("/v2/images/generate", json=BODY)).status_code == 402
        await client.post("/_sim/settings", json={"credits": 50})
        await client.post("/_sim/reset")
        stats = (await client.get("/_sim/stats")).json()
        assert (stats["jobs_created"], stats["credits_available"]) == (0, 50)
