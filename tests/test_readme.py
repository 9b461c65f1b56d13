"""The README cannot drift: its commands, snippets and library example are checked or run."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from batchflux.cli import main
from batchflux.manifest import load_job

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def block_after(marker: str) -> str:
    match = re.search(rf"<!-- readme:{marker} -->\s*```\w*\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no block marked {marker}"
    return match.group(1).strip()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.DOTALL)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = block_after("test-command")
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines(), "the README's test command is not a line of .ci/run"


def test_first_command_installs_and_runs_the_main_job_on_the_simulator() -> None:
    command = block_after("first-command")
    assert "pip install" in command and "batchflux run jobs/product-photos.yaml --sim" in command
    assert (ROOT / "jobs" / "product-photos.yaml").is_file()


@pytest.fixture
def jobs_copy(tmp_path: Path) -> Path:
    """A copy of jobs/ so snippets resolve assets/ and data/ like the real examples."""
    target = tmp_path / "jobs"
    shutil.copytree(ROOT / "jobs", target)
    return target


def test_every_yaml_manifest_snippet_is_valid(jobs_copy: Path) -> None:
    snippets = [s for s in blocks("yaml") if yaml.safe_load(s)]  # skip the comment-only one
    assert len(snippets) >= 3
    for n, snippet in enumerate(snippets):
        path = jobs_copy / f"readme-snippet-{n}.yaml"
        path.write_text(snippet, encoding="utf-8")
        spec = load_job(path)
        assert spec.entries, snippet


def test_the_jsonl_snippet_is_a_valid_manifest(jobs_copy: Path) -> None:
    (snippet,) = blocks("json")
    json.loads(snippet)
    path = jobs_copy / "readme-snippet.jsonl"
    path.write_text(snippet + "\n", encoding="utf-8")
    assert load_job(path).entries


def test_validate_and_plan_commands_as_shown(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    manifests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "jobs").glob("*.yaml"))
    assert main(["validate", *manifests]) == 0
    assert main(["plan", "jobs/dataset.yaml"]) == 0
    assert "80" in capsys.readouterr().out


def test_library_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    monkeypatch.chdir(tmp_path)
    code = block_after("library-example")
    # The in-process simulator's default job time is a couple of seconds; keep the same code
    # path but shorten the wait.
    monkeypatch.setattr("batchflux.batch.SIM_DEFAULT_JOB_SECONDS", 0.3)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert printed[0] == "0" and int(printed[1]) == 12
    assert (tmp_path / "out" / "from-python" / "results.jsonl").exists()


def test_simulator_serve_example_runs_as_shown(tmp_path: Path) -> None:
    """The README's `sim serve` command (on a free port) answers, and a run against it works."""
    (sim_block,) = [b for b in blocks("sh") if "batchflux sim serve" in b]
    serve_line = sim_block.replace("\\\n", " ").splitlines()[0]
    args = serve_line.split()[1:]  # drop "batchflux"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--job-seconds") + 1] = "0.2-0.5"  # same flag, shorter wait for the test
    server = subprocess.Popen([sys.executable, "-m", "batchflux", *args, "--log-level",
                               "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(f"{base}/_sim/stats", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        manifest = tmp_path / "two.yaml"
        manifest.write_text("prompts: [a lighthouse at dawn, a harbour at dusk]\n")
        env = {**os.environ, "APIFRAME_API_KEY": "afk_local"}
        run = subprocess.run(
            [sys.executable, "-m", "batchflux", "run", str(manifest), "--base-url", base,
             "--out", str(tmp_path / "out")], check=False, env=env, capture_output=True,
            text=True,
            timeout=120)
        stats = httpx.get(f"{base}/_sim/stats").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert run.returncode in (0, 1), run.stderr  # --fail-rate may fail one on purpose
    assert "batchflux: run:" in run.stdout
    assert stats["jobs_created"] >= 2 and stats["duplicate_jobs"] == 0
