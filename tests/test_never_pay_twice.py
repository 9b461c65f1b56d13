"""Never pay twice, never lose a result: the seams between resume, uploads, retries and the
run directory (issue 10). Each test reproduces one reported defect against the real simulator
and checks the paid-job ledger (tests/ledger.py), not just identical request bodies."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from ledger import Ledger
from PIL import Image
from runner_helpers import (
    API_KEY,
    check_run_directory,
    inprocess,
    load_results,
    run_until_first_result,
    start_run,
    write_manifest,
)

from batchflux import batch
from batchflux.config import Api
from batchflux.errors import RunAborted
from batchflux.models import RunOptions
from batchflux.report import build_report
from batchflux.sim import SimSettings, create_app, serve_in_thread

FAST = SimSettings(job_seconds=0.3, queue_seconds=0.05, render_mode="fast", credits=100_000)


def reference_manifest(tmp_path: Path, *, seeds: int = 4) -> Path:
    Image.new("RGB", (96, 64), (30, 120, 200)).save(tmp_path / "ref.png")
    manifest = tmp_path / "refs.yaml"
    manifest.write_text(
        "prompts:\n  - id: mug\n    text: the red mug from the reference, on oak\n"
        "    input_images: [ref.png]\n"
        f"grid:\n  seeds: {{count: {seeds}, start: 1}}\n")
    return manifest


def sim_stats(base_url: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/_sim/stats", timeout=10).json()


def wait_until(predicate: Any, proc: Any, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.05)


# -- defect 1: resume with local reference images -----------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_resume_with_reference_images_replays_in_flight_submits(tmp_path: Path,
                                                                 signum: int) -> None:
    """Killed (or interrupted) while 4 submits with an uploaded reference were in flight: the
    resumed run sends the same bodies (the journaled upload URL), so every submit is a replay;
    4 items, 4 paid jobs, all ok."""
    manifest = reference_manifest(tmp_path)
    out = tmp_path / "out"
    settings = replace(FAST, stall_rate=1.0, stall_seconds=4.0)
    ledger = Ledger()
    with serve_in_thread(settings) as base_url:
        proc = start_run(manifest, out, base_url)
        wait_until(lambda: sim_stats(base_url)["jobs_created"] == 4, proc)
        proc.send_signal(signum)
        proc.communicate(timeout=60)
        httpx.post(f"{base_url}/_sim/settings", json={"stall_rate": 0.0}, timeout=10)
        again = start_run(manifest, out, base_url)
        _, stderr = again.communicate(timeout=120)
        assert again.returncode == 0, stderr
        ledger.collect(base_url)
        stats = sim_stats(base_url)
    records = check_run_directory(out, expected_items=4)
    assert all(r["status"] == "ok" for r in records), records
    assert stats["jobs_created"] == 4 and stats["uploads"] == 1, stats
    ledger.assert_holds([out])
    assert ledger.paid_jobs() == 4
    # The resends were answered with the jobs the first run's sends created: this directory
    # paid for them, and its report says so.
    assert build_report(out)["credits_spent"] == stats["credits_spent"] == 8


# -- defect 2: --retry-failed after a lost submit answer --------------------------------------


class LoseFirstSubmitThenOutage(httpx.ASGITransport):
    """The first submit reaches the simulator (a job is created) but its answer is lost; every
    later submit meets a 503 outage until ``outage`` is switched off."""

    def __init__(self, app: Any) -> None:
        super().__init__(app=app)
        self.inner = httpx.ASGITransport(app=app)
        self.outage = True
        self.submits = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v2/images/generate" \
                and self.outage:
            self.submits += 1
            if self.submits == 1:
                response = await self.inner.handle_async_request(request)
                await response.aread()
                raise httpx.ReadError("connection lost before the answer", request=request)
            return httpx.Response(503, json={"error": "Service temporarily unavailable"},
                                  request=request)
        return await self.inner.handle_async_request(request)


async def test_retry_failed_after_a_lost_submit_answer_reuses_the_key(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=1, aspects=("1:1",))
    out = tmp_path / "out"
    app = create_app(FAST)
    transport = LoseFirstSubmitThenOutage(app)
    target = Api(api_key=API_KEY, base_url="http://sim.local", transport=transport)
    first = await batch.run_batch_async(manifest, RunOptions(out_dir=out, retries=1),
                                        target=target)
    (record,) = load_results(out)
    assert record["status"] == "failed" and record["job_id"] is None
    assert record["error"]["retryable"] is True
    assert first.exit_code == 1
    assert app.state.sim.counters.jobs_created == 1  # the lost answer's job exists

    transport.outage = False
    second = await batch.run_batch_async(
        manifest, RunOptions(out_dir=out, retries=1, retry_failed="retryable"), target=target)
    assert second.exit_code == 0
    ledger = Ledger()
    ledger.collect(app.state.sim)
    ledger.assert_holds([out])
    assert ledger.paid_jobs() == 1
    final = check_run_directory(out, expected_items=1)
    assert final[0]["status"] == "ok"


# -- defect 3: two items with the same key -----------------------------------------------------


async def test_items_with_the_same_key_are_generated_once_and_both_recorded(
        tmp_path: Path) -> None:
    manifest = tmp_path / "twins.yaml"
    manifest.write_text(
        "prompts:\n"
        "  - {id: first, text: a blue ceramic vase on a white table}\n"
        "  - {id: second, text: a blue ceramic vase on a white table}\n"
        "  - {id: other, text: a green glass bottle}\n"
        "grid:\n  seeds: [1, 2]\n")
    out = tmp_path / "out"
    app = create_app(FAST)
    options = RunOptions(out_dir=out, concurrency=8)
    result = await batch.run_batch_async(manifest, options, target=inprocess(app))
    assert result.exit_code == 0
    records = load_results(out)
    by_index = {r["index"]: r for r in records}
    assert sorted(by_index) == [0, 1, 2, 3, 4, 5]  # every item recorded
    for twin, original in ((2, 0), (3, 1)):
        assert by_index[twin]["key"] == by_index[original]["key"]
        assert by_index[twin]["status"] == "ok"
        assert by_index[twin]["duplicate_of"] == original
        assert by_index[twin]["files"] == by_index[original]["files"]
    check_run_directory(out, expected_items=4)  # four distinct keys, each with its image
    assert result.summary["counts"]["duplicates"] == 2
    assert app.state.sim.counters.jobs_created == 4
    again = await batch.run_batch_async(manifest, options, target=inprocess(app))
    assert again.exit_code == 0 and app.state.sim.counters.jobs_created == 4
    ledger = Ledger()
    ledger.collect(app.state.sim)
    ledger.assert_holds([out])


# -- defect 7: summary.json and the exit code describe the whole directory -----------------------


async def test_rerun_with_failures_present_exits_1_and_summary_keeps_the_totals(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=3, aspects=("1:1",))  # 12 items
    out = tmp_path / "out"
    app = create_app(replace(FAST, fail_rate=0.4, fail_capacity_share=0.0, fault_seed=3))
    first = await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=inprocess(app))
    failed = sum(r["status"] == "failed" for r in load_results(out))
    assert 0 < failed < 12 and first.exit_code == 1
    again = await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=inprocess(app))
    assert again.exit_code == 1  # the failures are still there
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 0 and summary["counts"]["failed"] == 0  # this run
    assert summary["totals"] == {**summary["totals"], "items": 12, "ok": 12 - failed,
                                 "failed": failed, "to_do": 0}
    tolerant = await batch.run_batch_async(manifest, RunOptions(out_dir=out, max_failure_rate=0.5),
                                           target=inprocess(app))
    assert tolerant.exit_code == 0


# -- smaller: not_started, credits of replayed jobs, stale results in the budget check ----------


async def test_an_early_stop_counts_every_item_it_did_not_reach(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=10, seeds=12, aspects=("1:1",))  # 120 items
    out = tmp_path / "out"
    app = create_app(replace(FAST, credits=100))  # 50 jobs of 2 credits
    with pytest.raises(RunAborted) as caught:
        await batch.run_batch_async(manifest, RunOptions(out_dir=out, concurrency=4),
                                    target=inprocess(app))
    summary = caught.value.summary
    counts = summary["counts"]
    assert counts["ok"] == 50
    assert counts["ok"] + counts["failed"] + counts["not_started"] == 120, counts
    assert summary["totals"]["to_do"] == 70


async def test_credits_spent_counts_only_jobs_this_run_created(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=2, aspects=("1:1",))
    app = create_app(FAST)
    first = await batch.run_batch_async(manifest, RunOptions(out_dir=tmp_path / "a"),
                                        target=inprocess(app))
    assert first.summary["credits_spent"] == 8
    # Another directory, same account, same manifest: every submit replays run a's jobs.
    second = await batch.run_batch_async(manifest, RunOptions(out_dir=tmp_path / "b"),
                                         target=inprocess(app))
    assert app.state.sim.counters.jobs_created == 4
    assert second.summary["counts"]["ok"] == 4
    assert second.summary["credits_spent"] == 0
    assert second.summary["replayed_jobs"] == 4


async def test_the_credits_of_an_interrupted_run_and_its_resume_add_up(tmp_path: Path) -> None:
    """Stopped with jobs in flight, then resumed: the jobs the first run created and the second
    re-attached to were paid by this directory. Each is counted once, by the run that records
    it, so the two summaries and the report say what the account was charged."""
    manifest = write_manifest(tmp_path, prompts=4, seeds=3, aspects=("1:1",))  # 12 items
    out = tmp_path / "out"
    app = create_app(replace(FAST, job_seconds=(0.3, 1.5)))
    first = await run_until_first_result(manifest, RunOptions(out_dir=out, concurrency=8), app)
    assert first.summary["stop_reason"] == "interrupted"
    second = await batch.run_batch_async(manifest, RunOptions(out_dir=out, concurrency=8),
                                         target=inprocess(app))
    assert second.exit_code == 0 and second.summary["counts"]["reattached"] >= 1
    charged = app.state.sim.stats_json()["credits_spent"]
    assert app.state.sim.counters.jobs_created == 12 and charged == 24
    assert first.summary["credits_spent"] + second.summary["credits_spent"] == charged
    assert build_report(out)["credits_spent"] == charged


async def test_budget_check_ignores_results_of_items_no_longer_in_the_manifest(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=2, aspects=("1:1",))  # 4 items
    out = tmp_path / "out"
    app = create_app(FAST)
    await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=inprocess(app))
    # Every prompt edited: 4 new items, none done; the 4 old ok lines are stale.
    manifest.write_text(manifest.read_text().replace("test product", "edited product"))
    with pytest.raises(RunAborted, match="budget"):
        await batch.run_batch_async(manifest, RunOptions(out_dir=out, budget=6),
                                    target=inprocess(app))
    assert app.state.sim.counters.jobs_created == 4


# -- defect 8 (the run's part): images deleted or changed after the run ----------------------


async def test_resume_fetches_deleted_or_resized_images_again_without_paying(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=2, aspects=("1:1",))  # 4 items
    out = tmp_path / "out"
    app = create_app(FAST)
    await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=inprocess(app))
    records = load_results(out)
    gone, shrunk = out / records[0]["files"][0]["path"], out / records[1]["files"][0]["path"]
    gone.unlink()
    shrunk.write_bytes(shrunk.read_bytes()[:-10])
    again = await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=inprocess(app))
    assert again.exit_code == 0
    assert again.summary["counts"]["refetched"] == 2 and again.summary["counts"]["ok"] == 2
    assert app.state.sim.counters.jobs_created == 4  # re-attached, not paid again
    check_run_directory(out, expected_items=4)


async def test_a_deleted_image_whose_job_expired_is_generated_again(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))  # 2 items
    out = tmp_path / "out"
    clock = [1_000_000.0]
    app = create_app(replace(FAST, job_seconds=0.0, queue_seconds=0.0, asset_ttl=60),
                     clock=lambda: clock[0])
    await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=inprocess(app))
    record = load_results(out)[0]
    (out / record["files"][0]["path"]).unlink()
    clock[0] += 3600  # a day later, as far as the API is concerned: the images are purged
    again = await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=inprocess(app))
    assert again.exit_code == 0 and again.summary["counts"]["refetched"] == 1
    assert app.state.sim.counters.jobs_created == 3
    check_run_directory(out, expected_items=2)
    ledger = Ledger()
    ledger.collect(app.state.sim)
    ledger.assert_holds([out])  # the second paid job is allowed: the first one expired


async def test_the_display_counts_jobs_the_provider_has_not_slots_waiting_to_submit(
        tmp_path: Path) -> None:
    """Workers waiting for a submit token hold a slot but no job: "in flight" is what the
    provider sees (it once showed 32/32 while the provider had 6)."""
    from batchflux.runner import NullReporter

    class Recorder(NullReporter):
        seen: ClassVar[list[tuple[int, int]]] = []

        def status(self, state: Any) -> None:
            # What the display says, and how many jobs exist that no result line closed yet.
            created = app.state.sim.counters.jobs_created
            self.seen.append((state.inflight, created - state.done))

    manifest = write_manifest(tmp_path, prompts=4, seeds=3, aspects=("1:1",))  # 12 items
    app = create_app(FAST)
    reporter = Recorder()
    await batch.run_batch_async(
        manifest, RunOptions(out_dir=tmp_path / "out", concurrency=12, max_inflight=12, rpm=240),
        target=inprocess(app), reporter=reporter)
    assert len(reporter.seen) >= 3, "the display was hardly updated"
    assert all(shown <= open_jobs for shown, open_jobs in reporter.seen), reporter.seen
