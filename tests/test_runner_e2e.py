"""End-to-end: real manifests run against the simulator, in-process and over loopback HTTP."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from runner_helpers import (
    check_run_directory,
    inprocess,
    load_results,
    loopback,
    run_until_first_result,
    write_manifest,
)

from batchflux import batch
from batchflux.config import Api
from batchflux.errors import ConfigError, ManifestError, RunAborted, UsageError
from batchflux.models import RunOptions
from batchflux.sim import SimSettings, create_app, serve_in_thread

FAST = SimSettings(job_seconds=0.3, queue_seconds=0.05, render_mode="fast", credits=100_000)


def stats_of(app: Any) -> dict[str, Any]:
    return app.state.sim.stats_json()


async def run_inprocess(manifest: Path, out: Path, settings: SimSettings, **options: Any):
    """Run ``manifest`` into ``out`` on a fresh in-process simulator; ``options`` are
    RunOptions fields."""
    app = create_app(settings)
    result = await batch.run_batch_async(manifest, RunOptions(out_dir=out, **options),
                                         target=inprocess(app))
    return result, stats_of(app)


async def test_inprocess_run_stores_every_image_verified(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)
    out = tmp_path / "out"
    result, stats = await run_inprocess(manifest, out, FAST)
    assert result.exit_code == 0
    records = check_run_directory(out, expected_items=12)
    assert all(r["status"] == "ok" for r in records)
    assert stats["jobs_created"] == 12 and stats["duplicate_jobs"] == 0
    sizes = {r["params"]["aspect_ratio"]: (r["files"][0]["width"], r["files"][0]["height"])
             for r in records}
    assert sizes["1:1"][0] == sizes["1:1"][1]
    assert sizes["16:9"][0] > sizes["16:9"][1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 12 and summary["credits_spent"] == 24
    assert summary["requests"]["submit"] == 12


async def test_second_run_skips_everything_and_pays_nothing(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=2)
    out = tmp_path / "out"
    app = create_app(FAST)
    common = dict(target=inprocess(app))
    await batch.run_batch_async(manifest, RunOptions(out_dir=out), **common)
    again = await batch.run_batch_async(manifest, RunOptions(out_dir=out), **common)
    assert again.summary["counts"]["skipped"] == 8 and again.summary["counts"]["ok"] == 0
    assert stats_of(app)["jobs_created"] == 8
    # A grown manifest pays only for its new items.
    write_manifest(tmp_path, prompts=3, seeds=2)
    grown = await batch.run_batch_async(manifest, RunOptions(out_dir=out), **common)
    assert grown.summary["counts"] == {**grown.summary["counts"], "ok": 4, "skipped": 8,
                                       "new": 4}
    assert stats_of(app)["jobs_created"] == 12
    check_run_directory(out, expected_items=12)


async def test_faults_over_loopback_end_ok_or_failed_with_the_right_category(
        tmp_path: Path) -> None:
    settings = replace(FAST, error_rate=0.15, drop_rate=0.08, truncate_rate=0.1,
                       corrupt_rate=0.05, fail_rate=0.2, fail_capacity_share=0.5, rps=30,
                       max_inflight=6, fault_seed=7)
    manifest = write_manifest(tmp_path, prompts=5, seeds=4)
    out = tmp_path / "out"
    with serve_in_thread(settings) as base_url:
        result = await batch.run_batch_async(
            manifest, RunOptions(out_dir=out, concurrency=12, max_inflight=12, retries=6),
            target=loopback(base_url))
        stats = httpx.get(f"{base_url}/_sim/stats").json()
    records = check_run_directory(out, expected_items=40)
    failed = [r for r in records if r["status"] == "failed"]
    categories = {r["error"]["category"] for r in failed}
    # Content-policy failures are final; everything else was retried to success.
    assert categories <= {"generation_failed"}
    for record in failed:
        assert "content policy" in record["error"]["message"]
        assert record["error"]["retryable"] is False
    assert stats["errors_injected"], stats  # faults really happened
    assert stats["rate_limited"] > 0 or stats["peak_inflight"] <= 6
    # Never paid twice: every paid job is one item's (FAILED jobs are refunded).
    assert stats["duplicate_jobs"] == 0, stats
    assert result.summary["counts"]["ok"] + result.summary["counts"]["failed"] == 40
    assert result.exit_code == (1 if failed else 0)


async def test_local_reference_images_are_uploaded_once(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (600, 400), (200, 30, 30)).save(tmp_path / "ref.png")
    manifest = tmp_path / "refs.yaml"
    manifest.write_text(
        "defaults:\n  input_images: [ref.png]\n  aspect_ratio: match_input_image\n"
        "prompts:\n  - the product on marble\n  - the product on oak\n"
        "grid:\n  seeds: [1, 2, 3]\n")
    out = tmp_path / "out"
    result, stats = await run_inprocess(manifest, out, FAST)
    assert result.exit_code == 0
    records = check_run_directory(out, expected_items=6)
    assert stats["uploads"] == 1
    for record in records:
        f = record["files"][0]
        assert abs(f["width"] / f["height"] - 1.5) < 0.05  # the reference's 3:2
        assert record["params"]["input_images"] == ["ref.png"]  # no local path leaks


async def test_out_of_credits_stops_cleanly_and_resume_finishes(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=2, aspects=("1:1",))
    out = tmp_path / "out"
    app = create_app(replace(FAST, credits=6))  # 3 jobs of 2 credits
    options = RunOptions(out_dir=out, concurrency=1)
    with pytest.raises(RunAborted) as caught:
        await batch.run_batch_async(manifest, options, target=inprocess(app))
    assert "credits" in str(caught.value)
    records = load_results(out)
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    app.state.sim.credits = 1000  # the team tops up
    result = await batch.run_batch_async(manifest, options, target=inprocess(app))
    assert result.exit_code == 0
    check_run_directory(out, expected_items=8)
    assert stats_of(app)["jobs_created"] == 8


async def test_budget_refuses_a_plan_over_it(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=2, aspects=("1:1",))
    with pytest.raises(RunAborted, match="budget"):
        await run_inprocess(manifest, tmp_path / "out", FAST, budget=10)


async def test_an_empty_key_is_a_configuration_error_and_nothing_is_written(
        tmp_path: Path) -> None:
    """The library reads no environment: a target without a key is refused at once (the
    command line's own message, naming APIFRAME_API_KEY and --sim, is in test_cli_run)."""
    manifest = write_manifest(tmp_path)
    with pytest.raises(ConfigError, match="no API key"):
        await batch.run_batch_async(manifest, RunOptions(out_dir=tmp_path / "out"),
                                    target=Api(api_key=""))
    assert not (tmp_path / "out").exists()


async def test_max_items_guard(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)
    with pytest.raises(UsageError, match="expands to 12 items, over the limit of 5"):
        await run_inprocess(manifest, tmp_path / "out", FAST, max_items=5)
    assert not (tmp_path / "out").exists()  # refused before anything was written or paid


async def test_invalid_key_stops_before_any_work(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    app = create_app(replace(FAST, api_keys=("afk_the_only_key",)))
    with pytest.raises(ConfigError, match="refused the key"):
        await batch.run_batch_async(manifest, RunOptions(out_dir=tmp_path / "out"),
                                    target=inprocess(app))
    assert stats_of(app)["jobs_created"] == 0


@pytest.mark.parametrize("mode", ["decode", "structure"])
async def test_each_file_records_the_check_it_passed(tmp_path: Path, mode: str) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=1)
    result, _ = await run_inprocess(manifest, tmp_path / "out", FAST, verify=mode)
    records = check_run_directory(tmp_path / "out", expected_items=4)
    assert {f["check"] for r in records for f in r["files"]} == {mode}
    assert result.summary["verification"][mode] == 4


async def test_max_items_override_can_raise_the_manifest_guard(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2, extra="run: {max_items: 5}\n")
    with pytest.raises(ManifestError, match="max_items"):
        await run_inprocess(manifest, tmp_path / "out", FAST)
    result, _ = await run_inprocess(manifest, tmp_path / "out", FAST, max_items=12)
    assert result.summary["counts"]["ok"] == 12


async def test_a_stop_event_stops_the_run_and_the_next_run_pays_for_nothing_twice(
        tmp_path: Path) -> None:
    """The library's ``stop`` (what Ctrl-C sets on the command line): the run ends at once
    with its summary, what was in flight stays journaled, and the next run re-attaches to
    those jobs instead of paying for them again."""
    from batchflux.store import ResumeIndex

    manifest = write_manifest(tmp_path, prompts=4, seeds=3)  # 24 items
    out = tmp_path / "out"
    app = create_app(replace(FAST, job_seconds=(0.3, 1.5)))
    options = RunOptions(out_dir=out, concurrency=8)
    stopped = await run_until_first_result(manifest, options, app)
    assert stopped.summary["stop_reason"] == "interrupted"
    assert stopped.exit_code == 1
    done = len(load_results(out))
    assert 1 <= done < 24
    index = ResumeIndex.load(out)
    journaled = len(index.jobs)
    assert journaled >= 1  # jobs were in flight when it stopped, and are on the journal
    # Every job the provider created is on a result line or the journal (a submit cut off
    # mid-flight is there as an intent, replayed by its idempotency key next time).
    created = stats_of(app)["jobs_created"]
    assert done + journaled <= created <= done + journaled + len(index.intents)

    again = await batch.run_batch_async(manifest, options, target=inprocess(app))
    assert again.exit_code == 0
    assert again.summary["counts"]["reattached"] == journaled
    check_run_directory(out, expected_items=24)
    stats = stats_of(app)
    assert stats["jobs_created"] == 24 and stats["duplicate_jobs"] == 0, stats
