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

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_TARGETS = {
    ("rate-bound", "achieved submits/s / limit"),
    ("rate-bound", "429 answers / submits"),
    ("rate-bound", "wall / ideal"),
    ("inflight-bound", "wall / ideal"),
    ("polling", "requests per image / plain's"),
    ("polling", "wall / plain's wall"),
    ("overhead", "images/s / plain's"),
}


def test_every_scenario_runs_at_smoke_size_and_reports_measured_ratios(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--smoke", "--json", str(rows_file),
         "--keep", str(tmp_path / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(rows_file.read_text())
    rows = report["rows"]
    assert report["smoke"] is True
    assert {row["scenario"] for row in rows} == {
        "rate-bound", "inflight-bound", "polling", "overhead", "memory", "resume"}
    targets = {(row["scenario"], row["metric"]) for row in rows if row["target"]}
    assert targets >= EXPECTED_TARGETS
    for row in rows:
        assert row["value"] is not None and row["value"] >= 0, row
        if row["target"]:
            assert row["met"] in (True, False), row
            assert row["value"] > 0, row  # a ratio of real measurements, never 0/0
    # The table is printed, one line per row, with the verdict column.
    for row in rows:
        assert row["metric"] in proc.stdout
    assert "targets met" in proc.stdout
    # Each client really ran: the batchflux run directories hold verified results.
    results = tmp_path / "runs" / "overhead" / "overhead-out" / "results.jsonl"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines and all(line["status"] == "ok" and line["files"] for line in lines)
    peer = tmp_path / "runs" / "overhead" / "overhead-peer" / "results.jsonl"
    assert len(peer.read_text().splitlines()) == len(lines)
