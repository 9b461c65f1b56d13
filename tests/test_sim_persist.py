"""Issue 13, point 1: a simulator with a state directory is the same world after a restart.

``create_app(settings, state_dir=DIR)`` journals every change in DIR; a new app on DIR (in this
process, or in a new ``batchflux sim serve --state-dir DIR`` after a SIGKILL) answers as the
real API would after a client's own restart: the same jobs at the clock's new time, the same
idempotency keys, the same balance, the same uploads.

Run as a script, this file measures a replay (see ``measure_replay``)::

    .venv/bin/python tests/test_sim_persist.py 100000
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from conftest import API_KEY, OasValidator, sim_client
from PIL import Image

from batchflux.sim import SimSettings, SimStateError, create_app
from batchflux.sim.persist import JOURNAL_NAME, VERSION
from batchflux.sim.state import SimState, canonical_hash

BODY = {"prompt": "a ceramic mug, product photography", "model": "flux-2-dev",
        "fluxParams": {"aspect_ratio": "custom", "width": 256, "height": 256, "seed": 7,
                       "output_format": "png"}}
TIMED = SimSettings(queue_seconds=(2.0, 2.0), job_seconds=(10.0, 10.0))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


class FakeClock:
    """Unix seconds that move only when told to."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def simulator(settings: SimSettings, state_dir: Path, *, mode: str = "inprocess",
                    **app_kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client on a new simulator app over ``state_dir``; the app is closed (its directory
    released) on exit, as a process that stops would release it."""
    async with sim_client(settings, mode=mode, state_dir=state_dir, **app_kw) as client:
        try:
            yield client
        finally:
            client.sim_app.close()  # type: ignore[attr-defined]


async def submit(client: httpx.AsyncClient, body: dict[str, Any] = BODY,
                 key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await client.post("/v2/images/generate", json=body, headers=headers)


async def get_job(client: httpx.AsyncClient, job_id: str, oas: OasValidator) -> dict[str, Any]:
    response = await client.get(f"/v2/jobs/{job_id}")
    assert response.status_code == 200, response.text
    oas.check("Job", response.json())
    return dict(response.json())


def without_hosts(job: dict[str, Any]) -> dict[str, Any]:
    """A job with its result URLs cut to their paths (a restarted server may have a new port)."""
    if job.get("result"):
        job = {**job, "result": {"images": [urlsplit(u).path for u in job["result"]["images"]]}}
    return job


# -- jobs ---------------------------------------------------------------------------------------


async def test_a_job_keeps_its_timeline_across_restarts(tmp_path: Path, oas: OasValidator,
                                                        sim_mode: str) -> None:
    """QUEUED before and after a restart, then PROCESSING and COMPLETED on schedule, with the
    answer the never-restarted world gives at the same instant, and the same image bytes."""
    clock = FakeClock()
    settings = replace(TIMED, render_mode="full")
    async with simulator(settings, tmp_path, mode=sim_mode, clock=clock) as first:
        accepted = await submit(first)
        assert accepted.status_code == 202
        oas.check("JobAccepted", accepted.json())
        job_id = accepted.json()["jobId"]
        before = await get_job(first, job_id, oas)
        assert before["status"] == "QUEUED"
        unrestarted: SimState = first.sim_app.state.sim  # type: ignore[attr-defined]
    images: list[bytes] = []
    for step, expected in ((0.0, "QUEUED"), (7.0, "PROCESSING"), (6.0, "COMPLETED"),
                           (0.0, "COMPLETED")):
        clock.advance(step)
        async with simulator(settings, tmp_path, mode=sim_mode, clock=clock) as client:
            job = await get_job(client, job_id, oas)
            assert job["status"] == expected
            reference = unrestarted.job_json(unrestarted.jobs[job_id], clock(), "http://x")
            assert without_hosts(job) == without_hosts(reference)
            if expected == "COMPLETED":
                image = await client.get(job["result"]["images"][0])
                assert image.status_code == 200
                assert image.headers["content-type"] == "image/png"
                images.append(image.content)
    assert job["progress"] == 100 and job["createdAt"] == before["createdAt"]
    assert len(images) == 2 and images[0] == images[1]  # rendered again, deterministically


async def test_a_job_that_ends_while_no_simulator_runs_is_booked_on_restart(
        tmp_path: Path, oas: OasValidator) -> None:
    """A job failing after its simulator stopped is FAILED, refunded, and counted as failed by
    the next one, as the real API would have done meanwhile."""
    clock = FakeClock()
    settings = replace(TIMED, fail_rate=1.0, credits=10)
    async with simulator(settings, tmp_path, clock=clock) as first:
        job_id = (await submit(first)).json()["jobId"]
        assert (await first.get("/v2/me")).json()["team"]["credits"] == 8
    clock.advance(60)
    async with simulator(settings, tmp_path, clock=clock) as client:
        job = await get_job(client, job_id, oas)
        assert job["status"] == "FAILED" and job["creditCost"] == 0
        stats = (await client.get("/_sim/stats")).json()
        assert (await client.get("/v2/me")).json()["team"]["credits"] == 10
    assert stats["failed_jobs"] == 1 and stats["credits_refunded"] == 2
    assert stats["credits_spent"] == 0 and stats["jobs_created"] == 1


async def test_another_key_still_cannot_see_a_replayed_job(tmp_path: Path) -> None:
    async with simulator(TIMED, tmp_path) as first:
        job_id = (await submit(first)).json()["jobId"]
    async with simulator(TIMED, tmp_path, api_key="afk_someone_else") as client:
        assert (await client.get(f"/v2/jobs/{job_id}")).status_code == 404
        assert (await client.get("/v2/jobs")).json()["jobs"] == []
        mine = await client.get(f"/v2/jobs/{job_id}", headers={"X-API-Key": API_KEY})
        assert mine.status_code == 200


async def test_the_state_directory_never_holds_the_api_key(tmp_path: Path) -> None:
    async with simulator(TIMED, tmp_path) as client:
        await submit(client, key="k-1")
        await client.post("/v2/uploads", files={"file": ("a.png", PNG, "image/png")})
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY[4:].encode() not in path.read_bytes(), path


# -- idempotency ----------------------------------------------------------------------------------


async def test_an_idempotency_key_is_remembered_across_a_restart(
        tmp_path: Path, oas: OasValidator, sim_mode: str) -> None:
    async with simulator(TIMED, tmp_path, mode=sim_mode) as first:
        original = (await submit(first, key="item-1")).json()["jobId"]
    async with simulator(TIMED, tmp_path, mode=sim_mode) as client:
        replay = await submit(client, key="item-1")
        assert replay.status_code == 202
        oas.check("JobAccepted", replay.json())
        assert replay.json()["jobId"] == original
        other = dict(BODY, prompt="a different mug")
        conflict = await submit(client, other, key="item-1")
        assert conflict.status_code == 409
        oas.check("ErrorResponse", conflict.json())
        assert conflict.json()["error"] == "Idempotency key reused with a different request body"
        fresh = await submit(client, other, key="item-2")
        assert fresh.status_code == 202 and fresh.json()["jobId"] != original
        stats = (await client.get("/_sim/stats")).json()
        ledger = (await client.get("/_sim/jobs")).json()["jobs"]
    assert stats["jobs_created"] == 2 and stats["idempotent_replays"] == 1
    assert [(j["idempotencyKey"], j["id"]) for j in ledger] == [
        ("item-1", original), ("item-2", fresh.json()["jobId"])]


async def test_an_idempotency_key_expires_across_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    settings = replace(TIMED, idempotency_ttl=100)
    async with simulator(settings, tmp_path, clock=clock) as first:
        original = (await submit(first, key="item-1")).json()["jobId"]
    clock.advance(101)
    async with simulator(settings, tmp_path, clock=clock) as client:
        again = (await submit(client, key="item-1")).json()["jobId"]
    assert again != original


# -- credits and counters -----------------------------------------------------------------------


async def test_credits_and_paid_job_counters_carry_over(tmp_path: Path,
                                                        oas: OasValidator) -> None:
    settings = replace(TIMED, credits=10)
    async with simulator(settings, tmp_path) as first:
        kept = (await submit(first)).json()["jobId"]
        twice = (await submit(first)).json()["jobId"]  # same body again: paid twice
        assert (await first.post(f"/_sim/jobs/{twice}/cancel")).status_code == 200
        before = (await first.get("/_sim/stats")).json()
    assert before["duplicate_jobs"] == 1 and before["credits_available"] == 8
    async with simulator(settings, tmp_path) as client:
        me = (await client.get("/v2/me")).json()
        oas.check("Me", me)
        assert me["team"]["credits"] == 8
        after = (await client.get("/_sim/stats")).json()
        for name in ("jobs_created", "duplicate_jobs", "credits_spent", "credits_refunded",
                     "credits_available", "inflight", "peak_inflight"):
            assert after[name] == before[name], name
        assert (await get_job(client, twice, oas))["status"] == "CANCELLED"
        assert (await get_job(client, kept, oas))["status"] == "QUEUED"
        for n in range(4):
            ok = await submit(client, dict(BODY, prompt=f"mug {n}"))
            assert ok.status_code == 202
        broke = await submit(client, dict(BODY, prompt="one too many"))
        assert broke.status_code == 402
        assert broke.json()["creditsAvailable"] == 0
        ledger = (await client.get("/_sim/jobs")).json()["jobs"]
    assert [j["id"] for j in ledger][:2] == [kept, twice] and len(ledger) == 6
    assert [j["refunded"] for j in ledger] == [False, True, False, False, False, False]


async def test_a_changed_credits_setting_sets_the_balance_on_restart(tmp_path: Path) -> None:
    """As ``POST /_sim/settings {"credits": N}`` does live: the balance becomes N."""
    async with simulator(replace(TIMED, credits=10), tmp_path) as first:
        await submit(first)
    async with simulator(replace(TIMED, credits=50), tmp_path) as client:
        assert (await client.get("/v2/me")).json()["team"]["credits"] == 50
    async with simulator(replace(TIMED, credits=50), tmp_path) as client:
        await submit(client)
    async with simulator(replace(TIMED, credits=50), tmp_path) as client:
        assert (await client.get("/v2/me")).json()["team"]["credits"] == 48
        assert (await client.get("/_sim/stats")).json()["jobs_created"] == 2


async def test_a_reset_empties_the_directory_too(tmp_path: Path) -> None:
    async with simulator(replace(TIMED, credits=10), tmp_path) as first:
        await submit(first)
        await first.post("/v2/uploads", files={"file": ("a.png", PNG, "image/png")})
        assert (await first.post("/_sim/reset")).status_code == 200
        await submit(first, dict(BODY, prompt="after the reset"))
    async with simulator(replace(TIMED, credits=10), tmp_path) as client:
        ledger = (await client.get("/_sim/jobs")).json()["jobs"]
        assert [j["prompt"] for j in ledger] == ["after the reset"]
        assert (await client.get("/v2/me")).json()["team"]["credits"] == 8
    assert list((tmp_path / "uploads").iterdir()) == []


# -- uploads --------------------------------------------------------------------------------------


async def test_an_upload_serves_its_bytes_after_a_restart_until_it_expires(
        tmp_path: Path, oas: OasValidator, sim_mode: str) -> None:
    clock = FakeClock()
    settings = replace(TIMED, upload_ttl=3600)
    async with simulator(settings, tmp_path, mode=sim_mode, clock=clock) as first:
        stored = await first.post("/v2/uploads", files={"file": ("a.png", PNG, "image/png")})
        assert stored.status_code == 201
        oas.check("Upload", stored.json())
    path = urlsplit(stored.json()["url"]).path
    clock.advance(3000)
    async with simulator(settings, tmp_path, mode=sim_mode, clock=clock) as client:
        served = await client.get(path)
        assert served.status_code == 200 and served.content == PNG
        assert served.headers["content-type"] == "image/png"
    clock.advance(601)
    async with simulator(settings, tmp_path, mode=sim_mode, clock=clock) as client:
        assert (await client.get(path)).status_code == 404
    assert list((tmp_path / "uploads").iterdir()) == []  # the cleanup worker's job


async def test_a_replayed_upload_sizes_match_input_image_jobs(tmp_path: Path,
                                                              oas: OasValidator) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (640, 320), "red").save(buffer, "PNG")
    async with simulator(TIMED, tmp_path) as first:
        url = (await first.post("/v2/uploads", files={"file": ("r.png", buffer.getvalue())})
               ).json()["url"]
    async with simulator(TIMED, tmp_path) as client:
        body = {"prompt": "the same, in blue", "model": "flux-2-dev",
                "fluxParams": {"aspect_ratio": "match_input_image", "input_images": [url]}}
        job_id = (await submit(client, body)).json()["jobId"]
        assert client.sim_app.state.sim.jobs[job_id].size == (640, 320)  # type: ignore[attr-defined]


# -- webhooks -------------------------------------------------------------------------------------


async def test_a_replayed_webhook_is_sent_once_its_key_is_seen_and_stays_delivered(
        tmp_path: Path, oas: OasValidator) -> None:
    received: list[httpx.Request] = []

    def hook(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(204)

    fast = SimSettings(job_seconds=0.05, queue_seconds=0.01, render_mode="fast",
                       webhook_tick=0.01)
    body = {"prompt": "hook me", "model": "flux-2-dev", "webhookUrl": "http://hooks.test/h"}
    async with simulator(fast, tmp_path) as first:  # no lifespan: nothing is delivered here
        job_id = (await submit(first, body)).json()["jobId"]
    await anyio.sleep(0.1)
    async with simulator(fast, tmp_path, api_key=None,
                         webhook_transport=httpx.MockTransport(hook)) as client:
        app = client.sim_app  # type: ignore[attr-defined]
        async with app.router.lifespan_context(app):
            await anyio.sleep(0.1)
            assert received == []  # the key that signs it has not been seen yet
            headers = {"X-API-Key": API_KEY}
            for _ in range(200):
                job = (await client.get(f"/v2/jobs/{job_id}", headers=headers)).json()
                if job["webhookStatus"] != "pending":
                    break
                await anyio.sleep(0.01)
    assert job["webhookStatus"] == "delivered"
    assert [json.loads(r.content)["event"] for r in received] == ["completed"]
    async with simulator(fast, tmp_path) as client:
        assert (await get_job(client, job_id, oas))["webhookStatus"] == "delivered"


# -- the journal ----------------------------------------------------------------------------------


def journal_lines(state_dir: Path) -> list[bytes]:
    return (state_dir / JOURNAL_NAME).read_bytes().splitlines(keepends=True)


async def test_a_torn_last_line_is_ignored_and_cut_off(tmp_path: Path,
                                                       oas: OasValidator) -> None:
    async with simulator(TIMED, tmp_path) as first:
        ids = [(await submit(first, key=f"k{n}")).json()["jobId"] for n in range(3)]
    lines = journal_lines(tmp_path)
    torn = lines[-1][: len(lines[-1]) // 2]  # the third job, as a SIGKILL mid-write leaves it
    (tmp_path / JOURNAL_NAME).write_bytes(b"".join(lines[:-1]) + torn)
    async with simulator(TIMED, tmp_path) as client:
        for job_id in ids[:2]:
            await get_job(client, job_id, oas)
        assert (await client.get(f"/v2/jobs/{ids[2]}")).status_code == 404
        redone = (await submit(client, key="k2")).json()["jobId"]  # it was never answered
        assert redone != ids[2]
    assert journal_lines(tmp_path)[:-1] == lines[:-1]  # appended after the cut, not onto it
    async with simulator(TIMED, tmp_path) as client:
        ledger = (await client.get("/_sim/jobs")).json()["jobs"]
    assert [j["id"] for j in ledger] == [*ids[:2], redone]


def write_header(state_dir: Path, header: dict[str, Any]) -> bytes:
    state_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(header).encode() + b"\n"
    (state_dir / JOURNAL_NAME).write_bytes(data)
    return data


def test_an_unknown_format_version_is_refused(tmp_path: Path) -> None:
    data = write_header(tmp_path, {"format": "batchflux-sim-state", "version": VERSION + 1})
    with pytest.raises(SimStateError) as refused:
        create_app(SimSettings(), state_dir=tmp_path)
    message = str(refused.value)
    assert f"format version {VERSION + 1} is not supported" in message
    assert f"reads version {VERSION}" in message and str(tmp_path) in message
    assert (tmp_path / JOURNAL_NAME).read_bytes() == data  # left as it was
    create_app(SimSettings(), state_dir=tmp_path / "elsewhere").close()  # the lock was released


def test_a_file_that_is_not_a_state_journal_is_refused(tmp_path: Path) -> None:
    write_header(tmp_path, {"jobs": []})
    with pytest.raises(SimStateError, match="is not a batchflux simulator state"):
        create_app(SimSettings(), state_dir=tmp_path)


def test_a_corrupt_record_is_refused_with_its_line(tmp_path: Path) -> None:
    create_app(SimSettings(), state_dir=tmp_path).close()
    with (tmp_path / JOURNAL_NAME).open("ab") as fh:
        fh.write(b'{"type":"job","at":1}\n{"type":"credits","at":1,"balance":5}\n')
    with pytest.raises(SimStateError, match=r"line 3: corrupt record"):
        create_app(SimSettings(), state_dir=tmp_path)


async def test_a_new_app_in_the_same_process_takes_the_directory_over(tmp_path: Path) -> None:
    old = create_app(TIMED, state_dir=tmp_path)
    new = create_app(TIMED, state_dir=tmp_path)
    transport = httpx.ASGITransport(app=old)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim.local",
                                 headers={"X-API-Key": API_KEY}) as client:
        refused = await submit(client)
        assert refused.status_code == 500  # it no longer owns the world: nothing was created
        assert refused.json() == {"error": "Internal server error"}
    assert old.state.sim.counters.jobs_created == 0
    new.close()


# -- a real process, killed ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(state_dir: Path, port: int) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "batchflux", "sim", "serve", "--port", str(port),
         "--state-dir", str(state_dir), "--job-seconds", "0.5", "--queue-seconds", "0.1",
         "--render", "fast", "--credits", "100000", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/_sim/stats", timeout=1)
            return server
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the simulator did not start: {server.communicate()[0]}")
            time.sleep(0.05)


SUBMITS = 600
WORKERS = 16
KILL_AFTER = 150


@pytest.mark.slow
async def test_sigkill_mid_submits_loses_no_answered_job_and_pays_none_twice(
        tmp_path: Path, oas: OasValidator) -> None:
    state_dir = tmp_path / "sim"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(state_dir, port)
    answered: dict[str, str] = {}  # Idempotency-Key -> jobId, for every 202 the client read
    try:
        with pytest.raises(SimStateError, match="in use by another process"):
            create_app(SimSettings(), state_dir=state_dir)
        keys = iter(range(SUBMITS))

        async def worker(client: httpx.AsyncClient) -> None:
            for n in keys:
                body = dict(BODY, prompt=f"item {n}")
                try:
                    response = await submit(client, body, key=f"item-{n}")
                except httpx.TransportError:
                    return  # the server is gone
                assert response.status_code == 202
                answered[f"item-{n}"] = response.json()["jobId"]
                if len(answered) == KILL_AFTER:
                    os.kill(server.pid, signal.SIGKILL)

        async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": API_KEY},
                                     timeout=10) as client, anyio.create_task_group() as tg:
            for _ in range(WORKERS):
                tg.start_soon(worker, client)
    finally:
        server.kill()
        server.communicate()
    assert server.returncode == -signal.SIGKILL
    assert KILL_AFTER <= len(answered) < SUBMITS

    server = start_server(state_dir, port)
    try:
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": API_KEY},
                                     timeout=10) as client:
            ledger = (await client.get("/_sim/jobs")).json()["jobs"]
            for key, job_id in answered.items():
                job = await get_job(client, job_id, oas)
                assert job["input"]["prompt"] == f"item {key.split('-')[1]}"
            by_key = {j["idempotencyKey"]: j["id"] for j in ledger}
            assert len(by_key) == len(ledger)  # no key was paid twice
            assert answered.items() <= by_key.items()
            # The client resumes: every key again, answered or not.
            for n in range(SUBMITS):
                response = await submit(client, dict(BODY, prompt=f"item {n}"), key=f"item-{n}")
                assert response.status_code == 202
                if f"item-{n}" in by_key:
                    assert response.json()["jobId"] == by_key[f"item-{n}"]
            stats = (await client.get("/_sim/stats")).json()
            final = (await client.get("/_sim/jobs")).json()["jobs"]
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    assert stats["jobs_created"] == len(final) == SUBMITS
    assert stats["duplicate_jobs"] == 0
    assert len({j["idempotencyKey"] for j in final}) == SUBMITS


def test_sim_serve_refuses_an_unknown_state_version(tmp_path: Path) -> None:
    write_header(tmp_path, {"format": "batchflux-sim-state", "version": 99})
    done = subprocess.run(
        [sys.executable, "-m", "batchflux", "sim", "serve", "--port", str(free_port()),
         "--state-dir", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "format version 99 is not supported" in done.stderr


# -- replay at scale ------------------------------------------------------------------------------


def fill(state_dir: Path, jobs: int, *, clock: FakeClock) -> None:
    """``jobs`` jobs through the live path (``SimState.create_job``, journaled), each under an
    idempotency key, a tenth of them cancelled."""
    app = create_app(SimSettings(credits=10 * jobs, render_mode="fast"), state_dir=state_dir,
                     clock=clock)
    state: SimState = app.state.sim
    owner = state.owner_of(API_KEY)
    for n in range(jobs):
        body = {"prompt": f"item {n}: a ceramic mug on a wooden table, soft light",
                "model": "flux-2-dev",
                "fluxParams": {"aspect_ratio": "16:9", "seed": n, "output_format": "webp"}}
        job = state.create_job(owner=owner, body=body, body_hash=canonical_hash(body),
                               now=clock(), size=(1360, 768), base_url="http://sim.local",
                               idempotency_key=f"batchflux-{n:048x}-1")
        if n % 10 == 9:
            state.cancel(job, clock())
        clock.advance(0.001)
    app.close()


def replay(state_dir: Path, clock: FakeClock) -> tuple[Any, float, int, int]:
    """A new app on ``state_dir``: (app, seconds, bytes it keeps, peak bytes while replaying)."""
    tracemalloc.start()
    started = time.perf_counter()
    app = create_app(SimSettings(credits=0, render_mode="fast"), state_dir=state_dir,
                     clock=clock)
    elapsed = time.perf_counter() - started
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return app, elapsed, kept, peak


def test_replaying_many_jobs_restores_every_one_in_bounded_memory(tmp_path: Path) -> None:
    jobs = 5_000
    clock = FakeClock()
    fill(tmp_path, jobs, clock=clock)
    clock.advance(3600)
    app, _, kept, peak = replay(tmp_path, clock)
    state: SimState = app.state.sim
    stats = state.stats_json()
    assert stats["jobs_created"] == jobs and len(state.idempotency) == jobs
    assert stats["failed_jobs"] == jobs // 10 and stats["completed_jobs"] == jobs - jobs // 10
    assert stats["inflight"] == 0 and stats["duplicate_jobs"] == 0
    assert state.ledger_json(clock())[-1]["seed"] == jobs - 1
    journal = (tmp_path / JOURNAL_NAME).stat().st_size
    # Replaying streams the journal: beyond what the world keeps, it needs a few lines at once.
    assert peak - kept < journal / 4  # holding the file alone would take more than it
    app.close()


def measure_replay(jobs: int) -> None:
    """Write ``jobs`` jobs, then time and size their replay, each in a fresh process (as a
    resumed run starts one)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        fill(Path(tmp), jobs, clock=FakeClock())
        written = time.perf_counter() - started
        size = (Path(tmp) / JOURNAL_NAME).stat().st_size
        print(f"{jobs:,} jobs journaled in {written:.2f} s ({size / 1e6:.1f} MB)", flush=True)
        for traced in ("", "--traced"):
            subprocess.run([sys.executable, __file__, "--replay", tmp, traced], check=True)


def replay_once(state_dir: Path, *, traced: bool) -> None:
    """Replay ``state_dir`` an hour after it was written; print what it took."""
    clock = FakeClock(FakeClock().now + 3600 * 24)
    if traced:
        app, seconds, kept, peak = replay(state_dir, clock)
        print(f"  under tracemalloc: {seconds:.2f} s, world {kept / 1e6:.0f} MB, peak while "
              f"replaying {peak / 1e6:.0f} MB")
    else:
        started = time.perf_counter()
        app = create_app(SimSettings(credits=0, render_mode="fast"), state_dir=state_dir,
                         clock=clock)
        seconds = time.perf_counter() - started
        jobs = len(app.state.sim.jobs)
        print(f"  replayed {jobs:,} jobs in {seconds:.2f} s ({jobs / seconds:,.0f} jobs/s)")
    app.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replay"]:
        replay_once(Path(sys.argv[2]), traced=sys.argv[3:4] == ["--traced"])
    else:
        measure_replay(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
