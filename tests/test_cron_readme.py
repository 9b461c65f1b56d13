"""The README sections for scheduled runs, review, datasets and sharding cannot drift: their
commands are run (on the simulator, with short jobs) from a copy of jobs/, and their crontab,
systemd and Kubernetes snippets match the files in jobs/deploy. The review loop (run, review,
run --reroll rejected, export --only accepted) is also checked for what it pays and exports."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from runner_helpers import load_imagefolder, load_results, sim_jobs_created

from batchflux.cli import build_parser, main
from batchflux.merge import final_records
from batchflux.reroll import reroll_seed
from batchflux.reviewapp import create_app
from batchflux.sim import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEPLOY = ROOT / "jobs" / "deploy"


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.DOTALL | re.MULTILINE)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.DOTALL)


def commands(text: str) -> list[list[str]]:
    """Every ``batchflux ...`` command of the sh blocks, comments and continuations removed."""
    found = []
    for block in code_blocks(text, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "batchflux":
                found.append(argv[1:])
    return found


@pytest.fixture
def in_jobs_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def review_like_a_person(argv: list[str]) -> None:
    """``batchflux review OUT`` as written (it serves until Ctrl-C; its default port falls back
    to a free one when taken), then what a reviewer does through it: accept two images, reject
    one; then Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-m", "batchflux", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = re.search(r"http://\S+/", proc.stdout.readline())
        assert url, "batchflux review did not print its URL"
        for _ in range(200):
            try:
                items = httpx.get(url.group(0) + "api/run", timeout=2).json()["items"]
                break
            except httpx.TransportError:
                time.sleep(0.05)
        ok = [item["key"] for item in items if not item["failed"]]
        for key, decision in zip(ok, ("accept", "accept", "reject"), strict=False):
            answer = httpx.post(url.group(0) + "api/decisions",
                                json={"key": key, "decision": decision})
            assert answer.status_code == 200, answer.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""


def run_readme_commands(title: str) -> list[list[str]]:
    argvs = commands(section(title))
    assert argvs, title
    for argv in argvs:
        if argv[0] == "review":
            review_like_a_person(argv)
            continue
        # Short simulated jobs and no submit-rate cap: the same code path, less waiting.
        fast = (argv + ["--sim-job-seconds", "0.2", "-j", "16", "--rpm", "60000"]
                if argv[0] == "run" else argv)
        assert main(fast) == 0, argv
    return argvs


def test_scheduled_runs_example_runs_and_resumes(in_jobs_copy: Path) -> None:
    run_readme_commands("Scheduled runs")
    again = run_readme_commands("Scheduled runs")  # the next night: nothing new to pay for
    summary = (in_jobs_copy / "out" / "nightly" / "summary.json").read_text()
    assert '"new": 0' in summary and again


def test_reviewing_a_run_example_runs(in_jobs_copy: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_readme_commands("Reviewing a run")
    out = in_jobs_copy / "out" / "product-photos"
    assert (out / "review" / "index.html").is_file()
    printed = capsys.readouterr().out
    assert "latency p50 / p95" in printed
    assert "2 images (accepted only)" in printed  # export --only accepted: what was accepted
    decisions = [json.loads(line)["decision"]
                 for line in (out / "review.jsonl").read_text().splitlines()]
    assert decisions == ["accept", "accept", "reject"]
    rows = (out / "dataset" / "hf" / "train" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(row)["decision"] for row in rows] == ["accepted", "accepted"]


def test_the_review_loop_in_four_commands_pays_once_per_rejection_and_exports_the_accepted(
        in_jobs_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's loop, its first block as written, on the built-in simulator: run, review
    (decisions through the review app's HTTP API, as its page sends them), run --reroll
    rejected, review the rerolls, export --only accepted, loaded with the datasets library."""
    loop = code_blocks(section("Reviewing a run"), "sh")[0]
    run, review, reroll, export = commands(f"```sh\n{loop}```")  # the first block: 4 commands
    assert [run[0], review[0], reroll[0], export[0]] == ["run", "review", "run", "export"]
    assert reroll == [*run, "--reroll", "rejected"]
    assert export[export.index("--only") + 1] == "accepted"
    fast = ["--sim-job-seconds", "0.2", "-j", "16", "--rpm", "60000"]
    out = in_jobs_copy / review[1]

    assert main(run + fast) == 0
    items = len(load_results(out))
    assert sim_jobs_created(out) == items  # one paid job per item

    def post(base: str, key: str, decision: str) -> None:
        answer = httpx.post(base + "/api/decisions", json={"key": key, "decision": decision})
        assert answer.status_code == 200, answer.text

    with serve_in_thread(app=create_app(out)) as base:
        keys = [item["key"] for item in httpx.get(base + "/api/run").json()["items"]]
        accepted = [keys[0], keys[1], keys[5]]
        rejected = [keys[2], keys[7], keys[30]]
        for key in accepted:
            post(base, key, "accept")
        for key in rejected:
            post(base, key, "reject")
        post(base, keys[3], "star")

    # docs/review.md's plan line, as written: the count and the cost first, nothing spent.
    (plan,) = [argv for argv in commands((ROOT / "docs" / "review.md").read_text())
               if argv[0] == "plan"]
    assert plan == ["plan", run[1], "--reroll", "rejected"]
    capsys.readouterr()
    assert main(plan) == 0
    assert (f"reroll rejected: {len(rejected)} new images for the rejected ones, "
            f"{2 * len(rejected)}.00 credits") in capsys.readouterr().out
    assert sim_jobs_created(out) == items

    assert main(reroll + fast) == 0
    assert sim_jobs_created(out) == items + len(rejected)  # exactly one per rejected image
    rerolls = {r["reroll_of"]: r for r in load_results(out) if r.get("reroll_of")}
    assert sorted(rerolls) == sorted(rejected)
    for original, record in rerolls.items():
        assert record["status"] == "ok" and record["attempt"] == 1
        assert record["seed"] == reroll_seed(original, 1)

    with serve_in_thread(app=create_app(out)) as base:  # the review again: rerolls in it
        shown = [item["key"] for item in httpx.get(base + "/api/run").json()["items"]]
        for original in rejected:
            assert shown[shown.index(original) + 1] == rerolls[original]["key"]
        post(base, rerolls[rejected[0]]["key"], "accept")
        post(base, rerolls[rejected[1]]["key"], "star")
    accepted.append(rerolls[rejected[0]]["key"])

    assert main(reroll + fast) == 0  # no reroll was rejected: nothing new to pay
    assert sim_jobs_created(out) == items + len(rejected)

    capsys.readouterr()
    assert main(export) == 0
    assert f"{len(accepted)} images (accepted only)" in capsys.readouterr().out
    loaded = load_imagefolder(out / "dataset" / "hf", tmp_path)
    assert sorted(row["key"] for row in loaded["rows"]) == sorted(accepted)
    assert {row["decision"] for row in loaded["rows"]} == {"accepted"}
    by_key = {row["key"]: row for row in loaded["rows"]}
    assert by_key[rerolls[rejected[0]]["key"]]["seed"] == reroll_seed(rejected[0], 1)


def test_datasets_example_runs(in_jobs_copy: Path) -> None:
    run_readme_commands("Datasets")
    base = in_jobs_copy / "out" / "dataset" / "dataset"
    assert (base / "hf" / "train" / "metadata.jsonl").is_file()
    assert list((base / "webdataset").glob("shard-*.tar"))


def test_sharding_example_runs_and_merges_everything(in_jobs_copy: Path) -> None:
    run_readme_commands("More than one machine")
    merged = final_records(in_jobs_copy / "out" / "dataset-all")
    assert len(merged) == 80 and all(r.status == "ok" for r in merged.values())


def test_the_readme_crontab_line_is_the_file() -> None:
    (block,) = code_blocks(section("Scheduled runs"), "text")
    assert block.strip() in (DEPLOY / "crontab").read_text().splitlines()


def test_the_systemd_snippet_of_docs_cron_matches_the_units() -> None:
    (block,) = code_blocks((ROOT / "docs" / "cron.md").read_text(encoding="utf-8"), "ini")
    service = configparser.ConfigParser(interpolation=None, strict=False)
    service.read_string((DEPLOY / "batchflux-nightly.service").read_text())
    timer = configparser.ConfigParser(interpolation=None, strict=False)
    timer.read_string((DEPLOY / "batchflux-nightly.timer").read_text())
    for key, value in [*service["Service"].items(), *timer["Timer"].items()]:
        if key.lower() in ("execstart", "oncalendar", "loadcredential", "successexitstatus"):
            assert value in block, key


def test_the_kubernetes_snippet_of_docs_sharding_matches_the_file() -> None:
    (block,) = code_blocks((ROOT / "docs" / "sharding.md").read_text(encoding="utf-8"), "yaml")
    shown = yaml.safe_load(block)
    real = yaml.safe_load((DEPLOY / "k8s-indexed-job.yaml").read_text())
    for key in ("completionMode", "completions", "parallelism"):
        assert shown["spec"][key] == real["spec"][key]
    (shown_c,) = shown["spec"]["template"]["spec"]["containers"]
    (real_c,) = real["spec"]["template"]["spec"]["containers"]
    assert shown_c["args"][:5] == real_c["args"][:5]
    assert build_parser().parse_args(
        [a.replace("$(SHARD_INDEX)", "0") for a in shown_c["args"]]).shard == "0/4"
