"""What a new user meets in the first hour (issue 13): budgets, limits and the built-in
simulator's balance. Every piece of advice batchflux prints is followed here, as a user would,
and must work."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from runner_helpers import load_results, write_manifest

from batchflux.cli import main

QUICK = ["--sim", "--sim-job-seconds", "0.05"]


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APIFRAME_API_KEY", raising=False)
    monkeypatch.delenv("APIFRAME_BASE_URL", raising=False)


def _advice(message: str) -> list[list[str]]:
    """The flags each piece of advice in ``message`` tells the user to add: the text in
    parentheses that starts with ``--``."""
    return [shlex.split(found) for found in re.findall(r"\((--[^)]*)\)", message)]


def test_a_refused_budget_leaves_nothing_behind_and_each_way_on_works(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=3, seeds=4, aspects=("1:1",))  # 12 items
    out = tmp_path / "out"
    run = ["run", str(manifest), *QUICK, "--out", str(out)]
    assert main([*run, "--budget", "9"]) == 1  # 12 x 2 credits is over 9
    message = capsys.readouterr().err
    assert "over the budget of 9" in message
    assert not out.exists()  # refused before anything was created
    advice = _advice(message)
    assert advice == [["--budget", "24"], ["--limit", "4"], ["--fill-budget"]], message

    # "run the first 4 of them now (--limit 4)"
    assert main([*run, "--budget", "9", *advice[1]]) == 0
    assert sum(r["status"] == "ok" for r in load_results(out)) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["to_do"] == 8
    # "spend up to the budget and stop (--fill-budget)": 9 credits pay for 4 more
    assert main([*run, "--budget", "9", *advice[2]]) == 0
    assert sum(r["status"] == "ok" for r in load_results(out)) == 8
    # "raise the budget (--budget 24)": what is left needs 8, and 24 covers it
    assert main([*run, *advice[0]]) == 0
    assert sum(r["status"] == "ok" for r in load_results(out)) == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"] == {**summary["totals"], "ok": 12, "to_do": 0}


def test_a_budget_under_one_item_says_so(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=2, aspects=("1:1",))
    assert main(["run", str(manifest), *QUICK, "--out", str(tmp_path / "out"),
                 "--budget", "1"]) == 1
    message = capsys.readouterr().err
    assert "does not pay for one item" in message
    assert _advice(message) == [["--budget", "4"]]


def test_the_max_items_guard_advice_works(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2, aspects=("1:1",))  # 6 items
    out = tmp_path / "out"
    assert main(["run", str(manifest), *QUICK, "--out", str(out), "--max-items", "5"]) == 2
    message = capsys.readouterr().err
    assert "over the limit of 5 (raise it with --max-items)" in message
    assert not out.exists()
    assert main(["run", str(manifest), *QUICK, "--out", str(out), "--max-items", "6"]) == 0


def test_fill_budget_needs_a_budget(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=1, aspects=("1:1",))
    assert main(["run", str(manifest), *QUICK, "--out", str(tmp_path / "o"),
                 "--fill-budget"]) == 2
    assert "--fill-budget needs a budget (--budget)" in capsys.readouterr().err


def test_the_built_in_simulator_never_stops_a_trial_for_credits(tmp_path: Path) -> None:
    """Its balance was a fixed 1,000 credits: a 3,000-item dataset stopped at 500 images."""
    manifest = write_manifest(tmp_path, prompts=6, seeds=90, aspects=("1:1",))  # 540 items
    out = tmp_path / "out"
    assert main(["run", str(manifest), *QUICK, "--out", str(out), "-j", "64"]) == 0
    assert sum(r["status"] == "ok" for r in load_results(out)) == 540


def test_sim_credits_shows_the_out_of_credits_path(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=6, aspects=("1:1",))  # 12 items
    out = tmp_path / "out"
    code = main(["run", str(manifest), *QUICK, "--out", str(out), "-j", "1",
                 "--sim-credits", "10"])
    assert code == 1
    assert "out of credits" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 5
    assert summary["counts"]["not_started"] == 7  # every item the run did not reach


def test_ctrl_c_then_the_same_sim_command_finishes_without_losing_or_repaying(
        tmp_path: Path) -> None:
    """The README's headline example (reference images), interrupted and resumed on the
    built-in simulator: its world lives in OUT/.batchflux/sim, so the resumed run finds every
    journaled job; nothing is lost, nothing is paid twice."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    jobs_dir = tmp_path / "jobs"
    shutil.copytree(root / "jobs", jobs_dir)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "batchflux", "run", str(jobs_dir / "product-photos.yaml"),
               "--sim", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    end = time.monotonic() + 120
    while not (results.exists() and results.read_bytes().count(b"\n") >= 8):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["lost"] == 0 and summary["counts"]["failed"] == 0
    assert summary["totals"] == {**summary["totals"], "items": 48, "ok": 48}
    created = [json.loads(line) for line in
               (out / ".batchflux" / "sim" / "journal.jsonl").read_text().splitlines()[1:]]
    jobs = [r for r in created if r.get("type") == "job"]
    assert len(jobs) == 48  # one paid job per item, across both runs
    assert len({r["idempotency_key"] for r in jobs}) == 48
    uploads = [r for r in created if r.get("type") == "upload"]
    assert len(uploads) == 2  # each reference image uploaded once, the URL reused on resume
