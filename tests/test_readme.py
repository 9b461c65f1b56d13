"""The README cannot drift: its commands, snippets and library example are checked or run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

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
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
    printed = capsys.readouterr().out.split()
    assert printed[0] == "0" and int(printed[1]) == 12
    assert (tmp_path / "out" / "from-python" / "results.jsonl").exists()
