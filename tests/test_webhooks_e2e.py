"""Webhook mode end to end, over loopback: the real simulator (uvicorn, ``serve_in_thread``)
delivers signed events to the run's own receiver (uvicorn, in the run's event loop).

Each test checks the run directory (every image verified on disk), the paid-job ledger (one
paid job per item) and the counters, never timings: how soon things happen is the bench's
(``python -m bench webhooks``)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from ledger import Ledger
from runner_helpers import API_KEY, check_run_directory, loopback, start_run, write_manifest

from batchflux import batch
from batchflux.models import RunOptions
from batchflux.sim import SimSettings, serve_in_thread, sign_webhook

FAST = SimSettings(job_seconds=0.3, queue_seconds=0.05, render_mode="fast", credits=100_000,
                   webhook_tick=0.01, webhook_backoff=0.05, fault_seed=3)
PATH = "/hooks/batchflux"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hook_url(port: int) -> str:
    return f"http://127.0.0.1:{port}{PATH}"


def hook_options(out: Path, port: int, **extra: Any) -> RunOptions:
    return RunOptions(out_dir=out, concurrency=extra.pop("concurrency", 4),
                      webhook_url=hook_url(port), webhook_listen=f"127.0.0.1:{port}", **extra)


def hook_flags(port: int) -> tuple[str, ...]:
    return ("--webhook-url", hook_url(port), "--webhook-listen", f"127.0.0.1:{port}")


def sim_stats(base_url: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/_sim/stats", timeout=10).json()


def sim_job(base_url: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/v2/jobs/{job_id}", headers={"X-API-Key": API_KEY},
                     timeout=10).json()


def polls_sent(stats: dict[str, Any]) -> int:
    return sum(stats["requests"].get("GET /v2/jobs/{id}", {}).values())


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.05)


def run(manifest: Path, options: RunOptions, base_url: str) -> batch.RunResult:
    return batch.run_batch(manifest, options, target=loopback(base_url))


# -- the happy path, and nothing changes without a URL ---------------------------------------


def test_each_job_ends_by_its_webhook_and_its_item_is_never_polled(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)  # 3 prompts x 2 seeds x 2 ratios
    out, port, ledger = tmp_path / "out", free_port(), Ledger()
    with serve_in_thread(FAST) as base_url:
        result = run(manifest, hook_options(out, port), base_url)
        stats = sim_stats(base_url)
        ledger.collect(base_url)
        records = check_run_directory(out, expected_items=12)
        submitted = sim_job(base_url, records[0]["job_id"])["input"]
    assert result.exit_code == 0 and all(r["status"] == "ok" for r in records)
    assert submitted["webhookUrl"] == hook_url(port)
    assert submitted["webhookEvents"] == ["completed", "failed"]
    hooks = result.summary["webhooks"]
    assert hooks["rejected"] == hooks["malformed"] == hooks["unknown"] == 0
    assert hooks["jobs_by_webhook"] >= 1
    assert hooks["jobs_by_webhook"] + hooks["jobs_by_poll"] == 12
    # The event is the job's end: an item whose webhook ended it asked the API nothing.
    assert sum(1 for r in records if r["polls"] == 0) >= hooks["jobs_by_webhook"]
    assert sum(r["polls"] for r in records) == hooks["fallback_polls"] == polls_sent(stats)
    assert stats["downloads"] == 12 and stats["duplicate_jobs"] == 0
    assert result.summary["download_delay_seconds"]["p50"] is not None
    ledger.assert_holds([out])
    assert ledger.paid_jobs() == 12


def test_without_a_webhook_url_submits_carry_none_and_the_summary_tells_none(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))
    out = tmp_path / "out"
    with serve_in_thread(FAST) as base_url:
        result = run(manifest, RunOptions(out_dir=out, concurrency=2), base_url)
        records = check_run_directory(out, expected_items=2)
        submitted = sim_job(base_url, records[0]["job_id"])["input"]
    assert result.exit_code == 0
    assert "webhookUrl" not in submitted and "webhookEvents" not in submitted
    assert "webhooks" not in result.summary


# -- lost, repeated and late events --------------------------------------------------------------


def test_a_third_of_the_webhooks_lost_every_item_still_ends_ok_once(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    out, port, ledger = tmp_path / "out", free_port(), Ledger()
    with serve_in_thread(replace(FAST, webhook_drop_rate=0.3)) as base_url:
        result = run(manifest, hook_options(out, port), base_url)
        stats = sim_stats(base_url)
        ledger.collect(base_url)
    records = check_run_directory(out, expected_items=12)
    assert result.exit_code == 0 and all(r["status"] == "ok" for r in records)
    dropped = stats["webhooks"]["dropped"]
    assert dropped >= 1  # fault_seed 3 loses some of the 12
    hooks = result.summary["webhooks"]
    # Each lost event's job was found by a fallback poll instead.
    assert hooks["jobs_by_poll"] >= dropped and hooks["fallback_polls"] >= dropped
    assert hooks["jobs_by_webhook"] + hooks["jobs_by_poll"] == 12
    assert stats["downloads"] == 12 and stats["duplicate_jobs"] == 0
    ledger.assert_holds([out])
    assert ledger.paid_jobs() == 12


def test_every_webhook_sent_twice_each_item_is_recorded_and_downloaded_once(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    out, port, ledger = tmp_path / "out", free_port(), Ledger()
    with serve_in_thread(replace(FAST, webhook_dup_rate=1.0)) as base_url:
        result = run(manifest, hook_options(out, port, concurrency=2), base_url)
        stats = sim_stats(base_url)
        ledger.collect(base_url)
    records = check_run_directory(out, expected_items=12)
    assert result.exit_code == 0 and all(r["status"] == "ok" for r in records)
    assert (out / "results.jsonl").read_text().count("\n") == 12
    hooks = result.summary["webhooks"]
    assert hooks["duplicates"] >= 1 and hooks["rejected"] == 0
    assert stats["webhooks"]["duplicated"] == 12
    assert stats["downloads"] == 12 and stats["duplicate_jobs"] == 0
    ledger.assert_holds([out])


def test_webhooks_delayed_past_the_fallback_poll_are_counted_late(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    out, port, ledger = tmp_path / "out", free_port(), Ledger()
    # 0.3 s jobs, events held 2.5 s: once job times are learned, the fallback poll (at least
    # 1 s after the learned time) finds each job before its event comes.
    with serve_in_thread(replace(FAST, webhook_delay=(2.5, 2.5))) as base_url:
        result = run(manifest, hook_options(out, port, concurrency=2), base_url)
        stats = sim_stats(base_url)
        ledger.collect(base_url)
    records = check_run_directory(out, expected_items=12)
    assert result.exit_code == 0 and all(r["status"] == "ok" for r in records)
    hooks = result.summary["webhooks"]
    assert hooks["jobs_by_poll"] >= 1 and hooks["fallback_polls"] >= hooks["jobs_by_poll"]
    assert hooks["late"] >= 1  # an event for a job a poll had already found
    assert stats["webhooks"]["delayed"] >= 1
    assert stats["downloads"] == 12 and stats["duplicate_jobs"] == 0
    ledger.assert_holds([out])


# -- events that are not what they claim ---------------------------------------------------------


def inject_during_run(tmp_path: Path, inject: Callable[[str, list[str]], list[int]],
                      ) -> tuple[batch.RunResult, list[int], list[dict[str, Any]], dict[str, Any]]:
    """A run of 4 items whose jobs take 2 s; while they run, ``inject(receiver URL, job ids)``
    posts to the receiver and returns the answers' status codes."""
    manifest = write_manifest(tmp_path, prompts=1, seeds=4, aspects=("1:1",))
    out, port = tmp_path / "out", free_port()
    settings = replace(FAST, job_seconds=(2.0, 2.0))
    with serve_in_thread(settings) as base_url, ThreadPoolExecutor(1) as pool:
        future = pool.submit(run, manifest, hook_options(out, port), base_url)

        def created() -> list[str]:
            return [job["id"] for job in
                    httpx.get(f"{base_url}/_sim/jobs", timeout=10).json()["jobs"]]

        wait_until(lambda: len(created()) == 4)
        codes = inject(f"http://127.0.0.1:{port}{PATH}", created())
        result = future.result(timeout=120)
        stats = sim_stats(base_url)
    records = check_run_directory(out, expected_items=4)
    return result, codes, records, stats


def forged_completion(job_id: str) -> bytes:
    return json.dumps({"event": "completed", "jobId": job_id, "status": "COMPLETED",
                       "progress": 100, "result": {"images": ["http://127.0.0.1:9/evil.png"]},
                       "creditCost": 2, "completedAt": "2026-01-01T00:00:00.000Z"}).encode()


def test_a_forged_signature_is_refused_counted_and_changes_nothing(tmp_path: Path) -> None:
    def inject(url: str, job_ids: list[str]) -> list[int]:
        codes = []
        for job_id in job_ids:
            body = forged_completion(job_id)
            codes.append(httpx.post(url, content=body, timeout=10, headers={
                "X-Webhook-Signature": sign_webhook("afk_not_the_run_key_1234", body)}
            ).status_code)
        codes.append(httpx.post(url, content=forged_completion(job_ids[0]),
                                timeout=10).status_code)  # no signature at all
        return codes

    result, codes, records, stats = inject_during_run(tmp_path, inject)
    assert codes == [401] * 5
    assert all(r["status"] == "ok" for r in records)  # the real images, fetched from the API
    hooks = result.summary["webhooks"]
    assert hooks["rejected"] == 5 and hooks["unknown"] == 0
    assert hooks["jobs_by_webhook"] + hooks["jobs_by_poll"] == 4
    assert stats["downloads"] == 4


def test_a_signed_event_for_an_unknown_job_is_accepted_counted_and_ignored(
        tmp_path: Path) -> None:
    stranger = str(uuid.uuid4())

    def inject(url: str, job_ids: list[str]) -> list[int]:
        body = forged_completion(stranger)
        return [httpx.post(url, content=body, timeout=10, headers={
            "X-Webhook-Signature": sign_webhook(API_KEY, body)}).status_code]

    result, codes, records, stats = inject_during_run(tmp_path, inject)
    assert codes == [204]
    assert all(r["status"] == "ok" for r in records)
    assert stranger not in {r["job_id"] for r in records}
    hooks = result.summary["webhooks"]
    assert hooks["unknown"] == 1 and hooks["rejected"] == 0
    assert stats["downloads"] == 4


# -- the command line: a taken port, a kill, a resume, the key ------------------------------------


def test_a_listen_port_already_taken_is_exit_78_and_nothing_is_spent(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    out = tmp_path / "out"
    with socket.socket() as taken, serve_in_thread(FAST) as base_url:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_run(manifest, out, base_url, *hook_flags(port))
        _, stderr = proc.communicate(timeout=60)
        stats = sim_stats(base_url)
    assert proc.returncode == 78, stderr
    assert f"cannot listen for webhooks on 127.0.0.1:{port}" in stderr
    assert "already in use" in stderr and "--webhook-listen" in stderr
    assert not out.exists()
    assert stats["jobs_created"] == 0 and "POST /v2/images/generate" not in stats["requests"]


def test_sigkill_mid_run_then_resume_reattaches_by_poll_and_pays_once(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    out, port, ledger = tmp_path / "out", free_port(), Ledger()
    settings = replace(FAST, job_seconds=(1.0, 1.5))
    with serve_in_thread(settings) as base_url:
        proc = start_run(manifest, out, base_url, *hook_flags(port), workers=4)
        wait_until(lambda: sim_stats(base_url)["jobs_created"] >= 6)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        again = start_run(manifest, out, base_url, *hook_flags(port), workers=4)
        _, stderr = again.communicate(timeout=120)
        stats = sim_stats(base_url)
        ledger.collect(base_url)
    assert again.returncode == 0, stderr
    records = check_run_directory(out, expected_items=12)
    assert all(r["status"] == "ok" for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["reattached"] >= 1
    # Each re-attached job is polled at once, unless its webhook (sent to the same URL, which
    # this run listens on again) came first.
    assert 1 <= summary["webhooks"]["reattach_polls"] <= summary["counts"]["reattached"]
    assert stats["duplicate_jobs"] == 0
    ledger.assert_holds([out])
    assert ledger.paid_jobs() == 12


def test_a_resume_with_another_webhook_url_resends_the_journaled_body(tmp_path: Path) -> None:
    """Killed while 4 submits hung (their jobs made, their answers not yet back): the resumed
    run, given another URL, resends each journaled submit with its old webhook fields, so the
    API replays the same jobs instead of answering 409."""
    manifest = write_manifest(tmp_path, prompts=1, seeds=4, aspects=("1:1",))
    out, first, second, ledger = tmp_path / "out", free_port(), free_port(), Ledger()
    with serve_in_thread(replace(FAST, stall_rate=1.0, stall_seconds=4.0)) as base_url:
        proc = start_run(manifest, out, base_url, *hook_flags(first))
        wait_until(lambda: sim_stats(base_url)["jobs_created"] == 4)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        httpx.post(f"{base_url}/_sim/settings", json={"stall_rate": 0.0}, timeout=10)
        again = start_run(manifest, out, base_url, *hook_flags(second))
        _, stderr = again.communicate(timeout=120)
        stats = sim_stats(base_url)
        ledger.collect(base_url)
        records = check_run_directory(out, expected_items=4)
        inputs = [sim_job(base_url, r["job_id"])["input"] for r in records]
    assert again.returncode == 0, stderr
    assert all(r["status"] == "ok" for r in records)
    assert stats["jobs_created"] == 4 and stats["idempotent_replays"] == 4
    assert "409" not in stats["requests"]["POST /v2/images/generate"]
    assert {i["webhookUrl"] for i in inputs} == {hook_url(first)}
    ledger.assert_holds([out])
    assert ledger.paid_jobs() == 4


def start_with_key(manifest: Path, out: Path, base_url: str, key: str,
                   *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "APIFRAME_API_KEY": key}
    env.pop("APIFRAME_BASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "batchflux", "run", str(manifest), "--base-url", base_url,
         "--out", str(out), "-j", "4", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_api_key_is_in_no_log_line_and_no_output_file(tmp_path: Path) -> None:
    key = "afk_webhook_secret_key_5b7e1d0c9a"
    secrets = [key, key.removeprefix("afk_"), hashlib.sha256(key.encode()).hexdigest()]
    manifest = write_manifest(tmp_path, prompts=2, seeds=2, aspects=("1:1",))
    out, port = tmp_path / "out", free_port()
    with serve_in_thread(replace(FAST, webhook_drop_rate=0.5)) as base_url:
        outputs = []
        for extra in (("--log-format", "json"), ("--progress",)):
            proc = start_with_key(manifest, out, base_url, key, *hook_flags(port), "--fresh",
                                  *extra)
            outputs += proc.communicate(timeout=120)
            assert proc.returncode == 0, outputs[-1]
    assert any("webhooks" in text for text in outputs)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != manifest]
    assert any(p.name == "journal.jsonl" for p in files)
    for secret in secrets:
        for text in outputs:
            assert secret not in text
        for path in files:
            assert secret.encode() not in path.read_bytes(), path
