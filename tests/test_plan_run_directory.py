"""Issue 13, point 4: `plan` knows what is done. It reads the run directory (read only: never
created, never locked) and counts items done, failed and to run exactly as `run` does, and the
cost it shows is what the following run spends."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from runner_helpers import inprocess

from batchflux import batch
from batchflux.cli import main
from batchflux.models import RunOptions
from batchflux.sim import SimSettings, create_app
from batchflux.store import RunStore

FAST = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="fast", credits=100_000,
                   cost_per_image=3)

NIGHTLY = """\
grid: {seeds: [7]}
prompts:
  - id: 2026-11-27-hero
    text: a lighthouse at dawn, editorial photo
  - id: 2026-11-27-detail
    text: a lighthouse lamp, close-up
run: {out_dir: out/nightly, cost_per_image: 3}
"""
TONIGHT = """\
  - id: 2026-11-28-hero
    text: a harbour at dusk, editorial photo
  - id: 2026-11-28-detail
    text: a harbour crane at dusk
  - id: 2026-11-28-hero-again   # the same request as 2026-11-28-hero: generated once
    text: a harbour at dusk, editorial photo
"""


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` with its size and mtime (ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


async def run_on(app: Any, manifest: Path, options: RunOptions | None = None
                 ) -> batch.RunResult:
    return await batch.run_batch_async(manifest, options, target=inprocess(app))


async def test_plan_of_a_grown_cron_manifest_costs_what_the_next_run_spends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's cron user: `plan` said 28 credits when the run would spend 4."""
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text(NIGHTLY, encoding="utf-8")
    out = tmp_path / "out" / "nightly"

    before = plan_json(capsys, str(manifest))
    assert not out.exists()  # plan never creates the run directory
    assert (before["items"], before["done"], before["to_run"]) == (2, 0, 2)
    assert before["estimated_cost"] == 6 and before["out_dir_exists"] is False

    app = create_app(FAST)
    first = await run_on(app, manifest)
    assert first.exit_code == 0 and first.summary["credits_spent"] == 6

    manifest.write_text(NIGHTLY.replace("run:", TONIGHT + "run:"), encoding="utf-8")
    held = RunStore(out, filename_template="{key}.{ext}")
    held.open()  # a run holds the lock: plan reads anyway, and changes nothing
    try:
        files = snapshot(out)
        plan = plan_json(capsys, str(manifest))
        assert snapshot(out) == files
    finally:
        held.close()
    assert plan["out_dir"] == "out/nightly" and plan["out_dir_exists"] is True
    assert (plan["items"], plan["done"], plan["failed"]) == (5, 2, 0)
    assert (plan["to_run"], plan["to_run_items"]) == (2, 3)
    assert plan["estimated_cost"] == 2 * 3 and plan["cost_per_image"] == 3
    assert plan["items"] == plan["done"] + plan["failed"] + plan["to_run_items"]

    jobs_before = app.state.sim.stats_json()["jobs_created"]
    spent_before = app.state.sim.stats_json()["credits_spent"]
    tonight = await run_on(app, manifest)
    assert tonight.exit_code == 0
    assert tonight.summary["credits_spent"] == plan["estimated_cost"]
    stats = app.state.sim.stats_json()
    assert stats["jobs_created"] - jobs_before == plan["to_run"]
    assert stats["credits_spent"] - spent_before == plan["estimated_cost"]

    after = plan_json(capsys, str(manifest))
    assert (after["done"], after["to_run"], after["estimated_cost"]) == (5, 0, 0)


async def test_plan_counts_failures_as_the_run_treats_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Failed items: a plain run leaves them; `--retry-failed` runs the retryable ones (a
    "No available capacity" failure), `=all` every one (a content-policy failure too)."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text("grid: {seeds: [1]}\nprompts: [a red fox, a blue bird]\n"
                        "run: {cost_per_image: 3}\n", encoding="utf-8")
    out = tmp_path / "out"
    no_retries = RunOptions(out_dir=out, retries=0)
    policy = create_app(replace(FAST, fail_rate=1.0, fail_capacity_share=0.0))
    assert (await run_on(policy, manifest, no_retries)).exit_code == 1
    manifest.write_text(manifest.read_text().replace("a blue bird]", "a blue bird, a cat]"))
    capacity = create_app(replace(FAST, fail_rate=1.0, fail_capacity_share=1.0))
    assert (await run_on(capacity, manifest, no_retries)).exit_code == 1

    plain = plan_json(capsys, str(manifest), "--out", str(out))
    assert (plain["items"], plain["done"], plain["failed"], plain["failed_retryable"]) == \
        (3, 0, 3, 1)
    assert (plain["to_run"], plain["estimated_cost"]) == (0, 0)
    retry = plan_json(capsys, str(manifest), "--out", str(out), "--retry-failed")
    assert (retry["failed"], retry["to_run"], retry["estimated_cost"]) == (2, 1, 3)
    every = plan_json(capsys, str(manifest), "--out", str(out), "--retry-failed=all")
    assert (every["failed"], every["to_run"], every["estimated_cost"]) == (0, 3, 9)

    # The text form says the same, and how to retry.
    assert main(["plan", str(manifest), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (f"run directory {out}: 0 done, 3 failed (1 retryable: add --retry-failed to run "
            "it again), 0 to run") in text
    assert "estimated cost: 0.00 credits for 0 items to run (3 per image)" in text

    healthy = create_app(FAST)
    result = await run_on(healthy, manifest, RunOptions(out_dir=out, retry_failed="retryable"))
    assert result.summary["credits_spent"] == retry["estimated_cost"]
    assert healthy.state.sim.stats_json()["jobs_created"] == retry["to_run"]


def test_plan_of_an_out_that_is_a_file_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text("prompts: [a red fox]\n", encoding="utf-8")
    not_a_dir = tmp_path / "results.txt"
    not_a_dir.write_text("x")
    assert main(["plan", str(manifest), "--out", str(not_a_dir)]) == 2
    err = capsys.readouterr().err
    assert err == (f"batchflux: {not_a_dir} is not a directory (give the run directory with "
                   "--out)\n")
