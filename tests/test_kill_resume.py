"""A run killed (SIGKILL), interrupted (SIGINT) or terminated (SIGTERM) mid-way, then resumed:
nothing submitted twice, nothing lost, nothing half-written."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from runner_helpers import check_run_directory, line_count, start_run, write_manifest

from batchflux.sim import SimSettings, serve_in_thread

SETTINGS = SimSettings(job_seconds=(0.3, 0.9), queue_seconds=0.05, render_mode="fast",
                       credits=100_000)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while line_count(path) < n:
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.monotonic() < end, f"{path} never reached {n} lines"
        time.sleep(0.02)


def stats(base_url: str) -> dict:
    return httpx.get(f"{base_url}/_sim/stats").json()


def test_sigkill_at_several_points_then_resume_pays_once_and_loses_nothing(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=6, seeds=5)  # 60 items
    out = tmp_path / "out"
    journal = out / ".batchflux" / "journal.jsonl"
    with serve_in_thread(SETTINGS) as base_url:
        # Kill points: while submitting, between journal lines, while results are written.
        for lines in (7, 40, 85):
            proc = start_run(manifest, out, base_url)
            wait_for_lines(journal, lines, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        proc = start_run(manifest, out, base_url)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert "60 ok" in stdout or "already done" in stdout, stdout
        final = stats(base_url)
    records = check_run_directory(out, expected_items=60)
    assert all(r["status"] == "ok" for r in records)
    assert final["duplicate_jobs"] == 0, final
    assert final["jobs_created"] == 60, final  # resubmits were idempotent replays


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_promptly_journals_and_resumes(tmp_path: Path, signum: int,
                                                       code: int) -> None:
    manifest = write_manifest(tmp_path, prompts=5, seeds=4)  # 40 items
    out = tmp_path / "out"
    slow = replace(SETTINGS, job_seconds=(1.0, 2.0))
    with serve_in_thread(slow) as base_url:
        proc = start_run(manifest, out, base_url)
        wait_for_lines(out / "results.jsonl", 3, proc)
        proc.send_signal(signum)
        started = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == code, (stdout, stderr)
        assert time.monotonic() - started < 10
        assert "Traceback" not in stderr
        assert "interrupted" in stderr
        assert (out / "summary.json").exists()
        before = stats(base_url)
        assert before["jobs_created"] < 40  # it really stopped submitting
        proc = start_run(manifest, out, base_url)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        after = stats(base_url)
    check_run_directory(out, expected_items=40)
    assert after["duplicate_jobs"] == 0 and after["jobs_created"] == 40, after


def test_a_second_run_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=4)
    out = tmp_path / "out"
    slow = replace(SETTINGS, job_seconds=(1.0, 2.0))
    with serve_in_thread(slow) as base_url:
        first = start_run(manifest, out, base_url)
        wait_for_lines(out / ".batchflux" / "journal.jsonl", 2, first)
        second = start_run(manifest, out, base_url)
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 75, stderr
        assert "in use by another batchflux run" in stderr
        first.communicate(timeout=120)
        assert first.returncode == 0
    check_run_directory(out, expected_items=32)
