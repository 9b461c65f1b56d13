"""Cron runs: the overlap lock, budgets, incremental nights, failure-rate exits, quiet output,
and the crontab line and systemd units the README shows."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runner_helpers import check_run_directory, load_results, write_manifest

from batchflux import batch
from batchflux.batch import exit_code_for
from batchflux.cli import build_parser, main
from batchflux.config import Simulator
from batchflux.models import RunOptions
from batchflux.sim import SimSettings, serve_in_thread
from batchflux.store import DirectoryLock, ResumeIndex

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "jobs" / "deploy"
FAST = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="fast", credits=100_000)
SIM = ["--sim", "--sim-job-seconds", "0.2"]
SIM_TARGET = Simulator(settings=FAST, job_seconds=0.2)


def cli(*args: str, cwd: Path | None = None,
        api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m batchflux ...`` with pipes (not a terminal), as cron runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIFRAME_")}
    if api_key:
        env["APIFRAME_API_KEY"] = api_key
    return subprocess.run([sys.executable, "-m", "batchflux", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd, check=False)


# --------------------------------------------------------------------------------------------
# The overlap lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))
    out = tmp_path / "out"
    (out / ".batchflux").mkdir(parents=True)
    (out / ".batchflux" / "lock").write_text(f"{dead_pid()}\n")
    done = cli("run", str(manifest), *SIM, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "2 ok" in done.stdout
    # Released at the end: no pid left behind, and free for the next night.
    assert (out / ".batchflux" / "lock").read_text() == ""
    with DirectoryLock(out / ".batchflux" / "lock"):
        pass


HOLD_LOCK = """
import sys, time
from pathlib import Path
from batchflux.store import DirectoryLock
DirectoryLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_lock_held_by_a_live_process_exits_75_without_touching_anything(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))
    out = tmp_path / "out"
    (out / ".batchflux").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".batchflux" / "lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        done = cli("run", str(manifest), *SIM, "--out", str(out))
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 75, done.stderr
    assert f"pid {holder.pid}" in done.stderr
    assert not (out / "results.jsonl").exists()
    assert (out / ".batchflux" / "lock").read_text().strip() == str(holder.pid)


# --------------------------------------------------------------------------------------------
# Budgets


async def test_the_budget_stops_submitting_and_in_flight_jobs_finish(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=6, seeds=2, aspects=("1:1",))  # 12 items
    out = tmp_path / "out"
    # The estimate (1 credit an image, given) passes the pre-check: 12 <= 13. The simulator
    # charges 2, so spending reaches the budget mid-run.
    options = RunOptions(out_dir=out, cost_per_image=1, budget=13, concurrency=4,
                         max_inflight=4)
    result = await batch.run_batch_async(manifest, options, target=SIM_TARGET)
    summary = result.summary
    assert result.exit_code == 1
    assert "budget of 13 credits reached" in summary["stop_reason"]
    counts = summary["counts"]
    assert counts["not_started"] > 0 and counts["failed"] == 0
    records = load_results(out)
    # Every job that was submitted finished and was recorded: nothing left in flight.
    index = ResumeIndex.load(out)
    assert index.jobs == {} and index.intents == {}
    assert len(records) == counts["ok"] == summary["requests"]["submit"]
    # Never more than the in-flight jobs past the budget: each submit checks what is owed.
    assert summary["credits_spent"] <= 13 + 2 * 4
    # The next night, with more budget, finishes the rest and pays only for it.
    more = await batch.run_batch_async(manifest, RunOptions(out_dir=out, cost_per_image=2,
                                                            budget=100), target=SIM_TARGET)
    assert more.exit_code == 0
    assert more.summary["counts"]["skipped"] == counts["ok"]
    assert more.summary["counts"]["new"] == 12 - counts["ok"]
    check_run_directory(out, expected_items=12)


def test_a_plan_over_the_budget_is_refused_before_any_submit(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=2, aspects=("1:1",))  # 8 x 2 credits
    out = tmp_path / "out"
    done = cli("run", str(manifest), *SIM, "--out", str(out), "--budget", "10")
    assert done.returncode == 1
    assert "about 16 credits for 8 items" in done.stderr and "over the budget of 10" in done.stderr
    assert not out.exists()  # refused before anything was created
    done = cli("run", str(manifest), *SIM, "--out", str(out), "--max-items", "5")
    assert done.returncode == 2 and "8 items, over the limit of 5" in done.stderr


# --------------------------------------------------------------------------------------------
# Incremental nights


def test_a_growing_manifest_only_pays_for_new_items(tmp_path: Path) -> None:
    manifest = tmp_path / "nightly.yaml"
    night_one = ("grid: {seeds: [7, 8]}\nprompts:\n"
                 "  - {id: lighthouse, text: a lighthouse at dawn}\n"
                 "  - {id: harbour, text: a harbour at dusk}\n")
    manifest.write_text(night_one)
    out = tmp_path / "out"
    first = cli("run", str(manifest), *SIM, "--out", str(out))
    assert first.returncode == 0, first.stderr
    manifest.write_text(night_one + "  - {id: orchard, text: an orchard in autumn}\n")
    second = cli("run", str(manifest), *SIM, "--out", str(out))
    assert second.returncode == 0, second.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["new"] == 2 and summary["counts"]["skipped"] == 4
    assert summary["credits_spent"] == 4  # two new images at 2 credits
    assert "2 ok, 0 failed, 4 already done" in second.stdout
    check_run_directory(out, expected_items=6)


async def test_retried_failures_are_counted(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=2, aspects=("1:1",))  # 8 items
    out = tmp_path / "out"
    failing = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="fast",
                          fail_rate=0.5, fail_capacity_share=0.0, fault_seed=3)
    first = await batch.run_batch_async(manifest, RunOptions(out_dir=out),
                                        target=Simulator(settings=failing, job_seconds=0.2))
    failed = first.summary["counts"]["failed"]
    assert failed > 0 and first.exit_code == 1
    again = await batch.run_batch_async(manifest, RunOptions(out_dir=out, retry_failed="all"),
                                        target=SIM_TARGET)
    counts = again.summary["counts"]
    assert counts["retried"] == failed and counts["new"] == 0
    assert counts["skipped"] == 8 - failed and counts["ok"] == failed
    assert again.exit_code == 0


# --------------------------------------------------------------------------------------------
# --max-failure-rate


@pytest.mark.parametrize(("ok", "failed", "rate", "code"), [
    (10, 0, None, 0), (9, 1, None, 1), (9, 1, 0.1, 0), (9, 1, 0.05, 1), (0, 3, 1.0, 0),
    (0, 0, 0.0, 0)])
def test_exit_code_for_the_failure_rate(ok: int, failed: int, rate: float | None,
                                        code: int) -> None:
    assert exit_code_for({"counts": {"ok": ok, "failed": failed}}, rate) == code


def test_a_stopped_run_fails_whatever_the_rate() -> None:
    summary = {"counts": {"ok": 5, "failed": 0}, "stop_reason": "budget of 10 credits reached"}
    assert exit_code_for(summary, 1.0) == 1


def test_max_failure_rate_decides_the_exit_code_end_to_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=2, aspects=("1:1",))  # 8 items
    failing = SimSettings(job_seconds=0.1, queue_seconds=0.02, render_mode="fast",
                          fail_rate=0.4, fail_capacity_share=0.0, fault_seed=3)
    monkeypatch.setenv("APIFRAME_API_KEY", "afk_cron_test")
    with serve_in_thread(failing) as base_url:
        strict = main(["run", str(manifest), "--base-url", base_url,
                       "--out", str(tmp_path / "strict")])
        tolerant = main(["run", str(manifest), "--base-url", base_url,
                         "--out", str(tmp_path / "tolerant"), "--max-failure-rate", "0.9"])
    failed = [r for r in load_results(tmp_path / "tolerant") if r["status"] == "failed"]
    assert 0 < len(failed) < 8
    assert strict == 1 and tolerant == 0
    assert main(["run", str(manifest), "--max-failure-rate", "1.5"]) == 2
    capsys.readouterr()


# --------------------------------------------------------------------------------------------
# Output: quiet off a terminal, --progress, --log-format json


def test_off_a_terminal_a_run_prints_only_its_summary_line(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))
    with serve_in_thread(FAST) as base_url:
        done = cli("run", str(manifest), "--base-url", base_url, "--out", str(tmp_path / "out"),
                   api_key="afk_cron_quiet")
    assert done.returncode == 0
    assert done.stderr == ""
    (line,) = done.stdout.splitlines()
    assert line.startswith("batchflux: run: 2 ok, 0 failed")


def test_a_quiet_simulated_run_still_says_it_is_simulated(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))
    done = cli("run", str(manifest), *SIM, "--out", str(tmp_path / "out"))
    assert done.returncode == 0
    (banner,) = done.stderr.splitlines()
    assert "SIMULATED" in banner
    (line,) = done.stdout.splitlines()
    assert line.startswith("batchflux: SIMULATED run: 2 ok, 0 failed")


def test_progress_asks_for_periodic_lines_off_a_terminal(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))
    done = cli("run", str(manifest), *SIM, "--out", str(tmp_path / "out"), "--progress")
    assert done.returncode == 0
    assert "starting: 2 items" in done.stderr and "SIMULATED" in done.stderr
    assert len(done.stdout.splitlines()) == 1
    assert cli("run", str(manifest), "--progress", "-q").returncode == 2  # one or the other


def test_json_log_format_is_one_event_a_line(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))
    done = cli("run", str(manifest), *SIM, "--out", str(tmp_path / "out"),
               "--log-format", "json")
    assert done.returncode == 0
    events = [json.loads(line) for line in done.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finish" and kinds.count("item") == 2
    assert events[-1]["summary"]["counts"]["ok"] == 2
    assert all(e["status"] == "ok" and e["key"] for e in events if e["event"] == "item")


# --------------------------------------------------------------------------------------------
# The crontab line and the systemd units of the README


CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def test_the_crontab_line_is_valid_and_runs_the_nightly_job() -> None:
    lines = [line for line in (DEPLOY / "crontab").read_text().splitlines()
             if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    (line,) = lines
    fields = line.split(None, 5)
    for text, (low, high) in zip(fields[:5], CRON_RANGES, strict=True):
        assert CRON_FIELD.match(text), text
        for number in map(int, re.findall(r"\d+", text.split("/")[0])):
            assert low <= number <= high, text
    command = fields[5]
    cd_part, _, run_part = command.partition(" && ")
    assert cd_part.startswith("cd ")
    argv = shlex.split(run_part)
    assert argv[0] == ".venv/bin/batchflux"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and (ROOT / args.manifest).is_file()
    assert args.max_failure_rate is not None and args.api_key_file
    assert "APIFRAME_API_KEY=" not in (DEPLOY / "crontab").read_text()  # no key in the file


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / name).read_text())
    return parser


def test_the_systemd_units_parse_and_run_the_nightly_job() -> None:
    service, timer = _unit("batchflux-nightly.service"), _unit("batchflux-nightly.timer")
    assert service["Service"]["Type"] == "oneshot"
    exec_start = shlex.split(service["Service"]["ExecStart"])
    assert exec_start[0].endswith("/.venv/bin/batchflux")
    args = build_parser().parse_args(
        [a.replace("${CREDENTIALS_DIRECTORY}", "/run/credentials/x") for a in exec_start[1:]])
    assert args.command == "run" and (ROOT / args.manifest).is_file()
    assert args.api_key_file.endswith("apiframe.key")
    assert "75" in service["Service"]["SuccessExitStatus"].split()
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed: .ci/run installs it (apt-get install "
                    "systemd); this test fails rather than skips without it")
    # verify checks that ExecStart exists: point the unit at this checkout's own venv.
    venv = Path(sys.executable).parent.parent
    text = (DEPLOY / "batchflux-nightly.service").read_text()
    text = text.replace("/srv/batchflux/.venv", str(venv)).replace("/srv/batchflux", str(ROOT))
    (tmp_path / "batchflux-nightly.service").write_text(text)
    shutil.copy(DEPLOY / "batchflux-nightly.timer", tmp_path)
    if not (venv / "bin" / "batchflux").exists():
        pytest.fail(f"no batchflux entry point in {venv}: install the project with pip -e")
    done = subprocess.run(["systemd-analyze", "verify", "batchflux-nightly.service",
                           "batchflux-nightly.timer"], cwd=tmp_path, capture_output=True,
                          check=False, text=True, timeout=60)
    problems = [line for line in done.stderr.splitlines() if "batchflux-nightly" in line]
    assert done.returncode == 0 and not problems, done.stderr
    calendar = _unit("batchflux-nightly.timer")["Timer"]["OnCalendar"]
    done = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True,
                          check=False, text=True, timeout=60)
    assert done.returncode == 0 and "03:00:00" in done.stdout, done.stderr
