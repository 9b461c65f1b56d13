"""Crashes at random points (SIGKILL, seeded) and torn last lines: every crash is resumed, and in
the end nothing was submitted twice, nothing was lost and nothing was left half-written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from runner_helpers import (
    check_run_directory,
    inprocess,
    line_count,
    load_results,
    start_run,
    write_manifest,
)

from batchflux import batch
from batchflux.models import RunOptions
from batchflux.sim import SimSettings, create_app, serve_in_thread
from batchflux.store import iter_jsonl

SETTINGS = SimSettings(job_seconds=(0.4, 1.2), queue_seconds=0.05, render_mode="fast",
                       credits=1_000_000)
KILLS = 10
SEED = 1234


def parsed_lines(path: Path) -> int:
    """Lines that parse; a torn last line (the crash hit mid-write) is tolerated here."""
    return sum(1 for _ in iter_jsonl(path))


def wait_until(condition, proc: subprocess.Popen[str], what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before {what}: {proc.returncode} {out} {err}")
        assert time.monotonic() < end, f"never reached {what}"
        time.sleep(0.01)


def test_ten_seeded_sigkills_each_resumed_pay_once_and_lose_nothing(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=10, seeds=10, aspects=("1:1",))  # 100 items
    total = 100
    out = tmp_path / "out"
    journal, results = out / ".batchflux" / "journal.jsonl", out / "results.jsonl"
    rng = random.Random(SEED)
    app = create_app(SETTINGS)
    kill_points = []
    with serve_in_thread(app=app) as base_url:
        for _ in range(KILLS):
            mode = rng.choice(("journal", "results", "delay"))
            proc = start_run(manifest, out, base_url, workers=6)
            if mode == "journal":
                target = line_count(journal) + rng.randint(1, 12)
                wait_until(lambda t=target: line_count(journal) >= t, proc, f"journal {target}")
            elif mode == "results":
                target = line_count(results) + rng.randint(1, 5)
                wait_until(lambda t=target: line_count(results) >= t, proc, f"results {target}")
            else:
                base = line_count(journal)
                wait_until(lambda b=base: line_count(journal) > b, proc, "a first submit")
                target = round(rng.uniform(0.0, 1.0), 3)
                time.sleep(target)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kill_points.append((mode, target))
            # What a crash leaves must still be readable by the next run.
            assert parsed_lines(journal) >= line_count(journal) - 1
            assert parsed_lines(results) >= line_count(results) - 1
            stats = app.state.sim.stats_json()
            assert stats["duplicate_jobs"] == 0, (kill_points, stats)
            assert parsed_lines(results) < total, f"the run finished before kill {kill_points}"
        proc = start_run(manifest, out, base_url, workers=6)
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, (stdout, stderr)
        final = app.state.sim.stats_json()
    assert len(kill_points) == KILLS
    records = check_run_directory(out, expected_items=total)
    assert all(r["status"] == "ok" for r in records)
    assert len(load_results(out)) == total  # one line per item, none lost, none doubled
    assert final["duplicate_jobs"] == 0, final
    assert final["jobs_created"] == total, final  # every resubmit was an idempotent replay
    figures = os.environ.get("BATCHFLUX_CHAOS_FIGURES")
    if figures:
        with open(figures, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"profile": "sigkill-x10", "items": total, "ok": total,
                                 "failed": 0, "lost": 0, "kills": kill_points,
                                 "jobs_created": final["jobs_created"],
                                 "idempotent_replays": final["idempotent_replays"],
                                 "duplicate_jobs": final["duplicate_jobs"]}) + "\n")


async def test_torn_last_lines_are_repaired_never_fatal(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)  # 12 items
    out = tmp_path / "out"
    app = create_app(replace(SETTINGS, job_seconds=0.2))
    options, target = RunOptions(out_dir=out), inprocess(app)
    await batch.run_batch_async(manifest, options, target=target)
    results = out / "results.jsonl"
    journal = out / ".batchflux" / "journal.jsonl"
    # A crash mid-write: the last result line is cut in half (its item is no longer
    # recorded) and the journal ends in half a line.
    raw = results.read_bytes()
    lines = raw.splitlines(keepends=True)
    lost = json.loads(lines[-1])
    results.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    journal.write_bytes(journal.read_bytes() + b'{"t":"job","key":"' +
                        lost["key"][:20].encode())
    resumed = await batch.run_batch_async(manifest, options, target=target)
    assert resumed.exit_code == 0
    assert resumed.summary["counts"]["skipped"] == 11
    assert resumed.summary["counts"]["ok"] == 1
    assert resumed.summary["counts"]["reattached"] == 1  # its journaled job, not a new one
    records = check_run_directory(out, expected_items=12)
    assert {r["key"] for r in records} >= {lost["key"]}
    assert journal.read_bytes().endswith(b"\n")
    assert line_count(journal) == parsed_lines(journal)
    stats = app.state.sim.stats_json()
    assert stats["jobs_created"] == 12 and stats["duplicate_jobs"] == 0, stats
