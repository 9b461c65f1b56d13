"""The benchmark harness runs end to end at tiny size, so that it cannot rot.

Benchmarks themselves are not tests (their numbers depend on the machine); this only checks
that every scenario starts its simulator process, runs the clients, and reports every row it
promises with numbers measured in that run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.scenarios import check

ROOT = Path(__file__).resolve().parent.parent
TIMED = ("inflight-user", "rate-user", "rate-bound", "inflight-bound", "polling")
EXPECTED_TARGETS = {
    *((f"{name} ({timing})", "wall / ideal") for name in TIMED[:4]
      for timing in ("queue", "no-queue")),
    ("inflight-user (queue)", "wall / plain's wall"),
    ("rate-user (queue)", "wall / plain's wall"),
    *((f"rate-user ({timing})", "429 answers / submits") for timing in ("queue", "no-queue")),
    *((f"rate-bound ({timing})", "achieved submits/s / limit")
      for timing in ("queue", "no-queue")),
    *((f"polling ({timing})", "requests per image / plain's")
      for timing in ("queue", "no-queue")),
    ("shards", "wall / ideal of one process"),
    ("shards", "429 answers / submits"),
    ("shards", "duplicate jobs"),
    ("overhead", "images/s / plain's"),
    ("webhooks", "HTTP requests / image"),
    ("webhooks", "requests per image / plain's"),
    ("webhooks", "completedAt to download start, p50"),
    ("webhooks", "wall / polling mode's wall"),
    ("webhooks (drop 0.3, dup 0.2)", "items ok"),
    ("webhooks (drop 0.3, dup 0.2)", "duplicate jobs"),
    ("webhooks (drop 0.3, dup 0.2)", "wall / polling mode's wall"),
    ("webhooks (all lost)", "wall / polling mode's wall"),
}


def test_every_scenario_runs_at_smoke_size_and_reports_measured_ratios(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--smoke", "--json", str(rows_file),
         "--keep", str(tmp_path / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(rows_file.read_text())
    rows = report["rows"]
    assert report["smoke"] is True
    # Every timing-sensitive scenario runs on the simulator's queued timing and on none.
    assert {row["scenario"] for row in rows} == {
        *(f"{name} ({timing})" for name in TIMED for timing in ("queue", "no-queue")),
        "shards", "overhead", "memory", "resume", "webhooks", "webhooks (drop 0.3, dup 0.2)",
        "webhooks (all lost)"}
    targets = {(row["scenario"], row["metric"]) for row in rows if row["target"]}
    assert targets >= EXPECTED_TARGETS, EXPECTED_TARGETS - targets
    for row in rows:
        assert row["value"] is not None and row["value"] >= 0, row
        if row["target"]:
            # The verdict is the target applied to the measured value, not a constant.
            assert row["met"] is check(row["value"], row["target"]), row
            if row["unit"] == "x" and "429" not in row["metric"]:
                assert row["value"] > 0, row  # a ratio of real measurements, never 0/0
    # Each side's command line is stated, with only the flags a user passes.
    for row in rows:
        if row["metric"] == "items / limit" and row["scenario"] != "shards":
            assert "batchflux: `batchflux run " in row["note"], row
            assert "--max-inflight" not in row["note"], row
    # The table is printed, one line per row, with the verdict column.
    for row in rows:
        assert row["metric"] in proc.stdout
    assert "targets met" in proc.stdout
    # Each client really ran, each of its two turns (batchflux 1 and 4, plain 2 and 3): the
    # batchflux run directories hold verified results.
    runs = tmp_path / "runs" / "overhead"
    for turn in (0, 3):
        results = runs / f"overhead-out-{turn}" / "results.jsonl"
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        assert lines and all(line["status"] == "ok" and line["files"] for line in lines)
    for turn in (1, 2):
        peer = runs / f"overhead-peer-{turn}" / "results.jsonl"
        assert len(peer.read_text().splitlines()) == len(lines)
    # Webhook mode really received: its run's jobs ended by their events.
    hooked = json.loads((tmp_path / "runs" / "webhooks" / "webhooks-out" /
                         "summary.json").read_text())
    assert hooked["webhooks"]["verified"] >= 1 and hooked["webhooks"]["jobs_by_webhook"] >= 1
