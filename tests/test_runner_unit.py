"""The pool and the item lifecycle on a virtual clock, against a small fake API.

No real sleeping: every wait goes through the virtual clock (``VirtualTime`` advances time only
when every task is blocked), and the API is an ``httpx.MockTransport`` whose jobs run on that
clock. This checks what the real-clock end-to-end tests cannot pin exactly: slow start,
polling with queue time, learning a rate, finding a cap, stopping at a budget.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from PIL import Image
from virtual_time import VirtualTime

from batchflux.apiframe import ApiframeClient
from batchflux.errors import RunAborted
from batchflux.expand import expand_job
from batchflux.manifest import load_job
from batchflux.resume import scan_items
from batchflux.runner import Runner, RunSettings
from batchflux.store import RunStore

BASE = "http://api.test"
JOB_PATH = re.compile(r"^/v2/jobs/([0-9a-f-]{36})$")
IMAGE_PATH = re.compile(r"^/cdn/([0-9a-f-]{36})\.png$")


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class FakeApi:
    """Apiframe's job routes on a virtual clock: each job queues ``queue`` s, then runs
    ``run`` s with progress in 5 % steps; submits over ``rate`` a second, or with ``cap`` jobs
    unfinished, are answered 429; ``credits`` run out."""

    vt: VirtualTime
    queue: float = 0.0
    run: float = 1.0
    rate: float | None = None
    cap: int | None = None
    credits: int = 10**6
    cost: int = 2
    epoch: float = field(default_factory=time.time)
    jobs: dict[str, tuple[float, str]] = field(default_factory=dict)  # id -> (created, key)
    keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    answers: Counter[str] = field(default_factory=Counter)
    peak_running: int = 0
    _tokens: float = 0.0
    _refilled: float = 0.0

    def __post_init__(self) -> None:
        self.image = _png((1024, 1024))
        self._tokens = self.rate or 0.0

    def _iso(self, t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.epoch + t)) + \
            f".{int((self.epoch + t) % 1 * 1000):03d}Z"

    def _running(self) -> int:
        now = self.vt.now
        return sum(1 for created, _ in self.jobs.values()
                   if now < created + self.queue + self.run)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path, now = request.url.path, self.vt.now
        if path == "/v2/me":
            return httpx.Response(200, json={"team": {"credits": self.credits}})
        if path == "/v2/models":
            return httpx.Response(200, json={"models": [
                {"id": "flux-2-dev", "costMax": self.cost}]})
        if path == "/v2/images/generate":
            return self._submit(request, now)
        if (match := JOB_PATH.match(path)) is not None:
            return self._job(match.group(1), now)
        if IMAGE_PATH.match(path):
            return httpx.Response(200, content=self.image,
                                  headers={"content-type": "image/png"})
        return httpx.Response(404, json={"error": "Not found"})

    def _submit(self, request: httpx.Request, now: float) -> httpx.Response:
        key = request.headers.get("idempotency-key", "")
        if key in self.keys:
            self.answers["replay"] += 1
            return httpx.Response(202, json={"jobId": self.keys[key], "status": "QUEUED"})
        if self.rate is not None:
            self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens < 1.0:
                self.answers["429"] += 1
                return httpx.Response(429, json={"error": "Rate limit exceeded"},
                                      headers={"Retry-After": "1"})
            self._tokens -= 1.0
        if self.cap is not None and self._running() >= self.cap:
            self.answers["429"] += 1
            return httpx.Response(429, json={"error": "Rate limit exceeded"},
                                  headers={"Retry-After": "1"})
        if self.credits < self.cost:
            return httpx.Response(402, json={"error": "Insufficient credits",
                                             "creditsRequired": self.cost,
                                             "creditsAvailable": self.credits})
        self.credits -= self.cost
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = (now, key)
        self.keys[key] = job_id
        self.answers["202"] += 1
        self.peak_running = max(self.peak_running, self._running())
        return httpx.Response(202, json={"jobId": job_id, "status": "QUEUED"})

    def _job(self, job_id: str, now: float) -> httpx.Response:
        self.answers["poll"] += 1
        created, _ = self.jobs[job_id]
        started, ends = created + self.queue, created + self.queue + self.run
        if now < started:
            status, progress = "QUEUED", 0
        elif now < ends:
            status, progress = "PROCESSING", min(99, int((now - started) / self.run * 20) * 5)
        else:
            status, progress = "COMPLETED", 100
        done = status == "COMPLETED"
        return httpx.Response(200, json={
            "id": job_id, "status": status, "progress": progress,
            "result": {"images": [f"{BASE}/cdn/{job_id}.png"]} if done else None,
            "error": None, "creditCost": self.cost, "createdAt": self._iso(created),
            "completedAt": self._iso(ends) if done else None, "expired": False})


def _manifest(tmp: Path, items: int) -> Path:
    path = tmp / "m.yaml"
    path.write_text("defaults: {output_format: png}\n"
                    f"grid: {{seeds: {{count: {items}, start: 1}}}}\n"
                    "prompts: [a lighthouse at dusk]\nrun: {max_items: 100000}\n")
    return path


async def _run(tmp: Path, api: FakeApi, *, items: int, **settings: Any) -> tuple[dict[str, Any],
                                                                                   Runner]:
    """Run ``items`` items through a Runner on ``api``'s virtual clock."""
    vt = api.vt
    spec = load_job(_manifest(tmp, items))
    store = RunStore(tmp / "out", filename_template="{key12}_{seed}.{ext}")
    index = store.open()
    client = ApiframeClient(api_key="afk_unit_test", base_url=BASE, allow_insecure=True,
                            transport=httpx.MockTransport(api.handle))
    runner = Runner(client=client, store=store, index=index,
                    settings=RunSettings(**{"verify": "structure", **settings}),
                    clock=vt.clock, sleep=vt.sleep)
    done = anyio.Event()
    summary: dict[str, Any] = {}
    aborted: list[RunAborted] = []

    async def main() -> None:
        try:
            scan = scan_items(expand_job(spec), index)
            summary.update(await runner.run(expand_job(spec), total=scan.total))
        except RunAborted as exc:  # raised below, outside the task group
            aborted.append(exc)
        finally:
            done.set()

    try:
        async with client, anyio.create_task_group() as tg:
            tg.start_soon(vt.drive, done)
            await main()
    finally:
        store.close()
    if aborted:
        raise aborted[0]
    return summary, runner


async def test_slow_start_doubles_the_cap_each_round_trip_up_to_j(tmp_path: Path) -> None:
    api = FakeApi(VirtualTime(threads=True), run=2.0)
    summary, _runner = await _run(tmp_path, api, items=240, max_inflight=64)
    assert summary["counts"]["ok"] == 240
    history = summary["inflight_cap"]["history"]
    assert history[0][1] == 32  # half of -j
    reached = next(t for t, n in history if n == 64)
    assert 1.9 <= reached <= 4.5  # about one 2 s round trip of +1 per completion
    assert api.peak_running == 64 and api.answers["429"] == 0


async def test_queued_jobs_are_seen_done_within_a_tenth_of_a_second(tmp_path: Path) -> None:
    """1 s of queue and 1 s of run: the end of each job is seen ~0.1 s after it (the old
    schedule read progress against the submit and saw them ~1.9 s late)."""
    api = FakeApi(VirtualTime(threads=True), queue=1.0, run=1.0)
    summary, _ = await _run(tmp_path, api, items=120, max_inflight=16)
    assert summary["counts"]["ok"] == 120
    lag = summary["completion_lag_seconds"]
    assert lag["mean"] is not None and lag["mean"] <= 0.15
    assert summary["requests"]["poll"] / 120 <= 3.5


async def test_a_rate_limit_is_learned_and_kept_to(tmp_path: Path) -> None:
    api = FakeApi(VirtualTime(threads=True), run=1.0, rate=10.0)
    summary, runner = await _run(tmp_path, api, items=200, max_inflight=64)
    assert summary["counts"]["ok"] == 200
    learned = runner.gate.learner.history[-1][1]  # the last measured rate (it then probes up)
    assert 9.0 <= learned <= 11.0
    assert api.answers["429"] / (api.answers["429"] + api.answers["202"]) <= 0.05
    assert summary["elapsed_seconds"] <= 1.15 * (200 / 10.0 + 1.0)


async def test_a_cap_is_found_and_pinned(tmp_path: Path) -> None:
    api = FakeApi(VirtualTime(threads=True), run=2.0, cap=6)
    summary, runner = await _run(tmp_path, api, items=100, max_inflight=32)
    assert summary["counts"]["ok"] == 100
    assert runner.gate.inflight.pinned == 6
    assert summary["elapsed_seconds"] <= 1.25 * (100 / 6 * 2.0)


async def test_running_out_of_credits_stops_and_finishes_what_is_paid(tmp_path: Path) -> None:
    api = FakeApi(VirtualTime(threads=True), run=1.0, credits=20)  # ten jobs
    with pytest.raises(RunAborted) as caught:
        await _run(tmp_path, api, items=40, max_inflight=4)
    summary = caught.value.summary
    assert summary is not None and summary["counts"]["ok"] == 10
    assert summary["counts"]["not_started"] == 30


async def test_a_budget_stops_submitting_before_it_is_passed(tmp_path: Path) -> None:
    api = FakeApi(VirtualTime(threads=True), run=1.0)
    summary, _ = await _run(tmp_path, api, items=40, max_inflight=4, budget=13.0)
    assert summary["counts"]["ok"] == 6  # 6 x 2 credits: a seventh would pass 13
    assert summary["stop_reason"] == "budget of 13 credits reached"
    assert api.answers["202"] == 6
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["ok"] * 6
