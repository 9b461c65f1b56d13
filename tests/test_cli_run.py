"""`batchflux run` from the command line: exit codes, honest output, no secret anywhere."""

from __future__ import annotations

import json
import re
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from runner_helpers import API_KEY, check_run_directory, write_manifest

from batchflux.cli import main
from batchflux.sim import SimSettings, serve_in_thread

FAST = SimSettings(job_seconds=0.3, queue_seconds=0.05, render_mode="fast", credits=100_000)


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APIFRAME_API_KEY", raising=False)
    monkeypatch.delenv("APIFRAME_BASE_URL", raising=False)
    monkeypatch.setattr("batchflux.batch.SIM_DEFAULT_JOB_SECONDS", 0.3)


def test_sim_run_is_honest_and_ends_with_where_everything_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=1)
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--sim", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "SIMULATED" in captured.err
    (line,) = [x for x in captured.out.splitlines() if x.startswith("batchflux:")]
    assert "SIMULATED run: 4 ok, 0 failed" in line
    for name in ("images", "results.jsonl", "summary.json"):
        assert str(out / name) in line
    check_run_directory(out, expected_items=4)


def test_no_key_without_sim_exits_78_naming_both_ways(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path)
    assert main(["run", str(manifest), "--out", str(tmp_path / "out")]) == 78
    err = capsys.readouterr().err
    assert "APIFRAME_API_KEY" in err and "--sim" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_invalid_manifest_exits_65_with_positions(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  - id: a\n    text: hi\n    output_quality: 300\n")
    assert main(["run", str(bad), "--sim", "--out", str(tmp_path / "out")]) == 65
    err = capsys.readouterr().err
    assert re.search(r"bad\.yaml:4:\d+: prompts\[0\]\.output_quality: ", err), err
    assert not (tmp_path / "out").exists()


def test_unreachable_api_exits_75(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("APIFRAME_API_KEY", API_KEY)
    manifest = write_manifest(tmp_path)
    code = main(["run", str(manifest), "--base-url", f"http://127.0.0.1:{port}",
                 "--out", str(tmp_path / "out")])
    assert code == 75
    assert "not available" in capsys.readouterr().err


def test_refused_key_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIFRAME_API_KEY", API_KEY)
    manifest = write_manifest(tmp_path)
    with serve_in_thread(replace(FAST, api_keys=("afk_someone_else",))) as base_url:
        code = main(["run", str(manifest), "--base-url", base_url,
                     "--out", str(tmp_path / "out")])
    assert code == 78
    err = capsys.readouterr().err
    assert "Invalid API key" in err and API_KEY not in err


def test_plain_http_to_a_remote_host_is_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIFRAME_API_KEY", API_KEY)
    manifest = write_manifest(tmp_path)
    code = main(["run", str(manifest), "--base-url", "http://api.example.com",
                 "--out", str(tmp_path / "out")])
    assert code == 78
    assert "plain-http" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    assert main(["run", str(manifest), "--sim", "-j", "0"]) == 2
    assert main(["run", str(manifest), "--resume", "--fresh"]) == 2


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_key_appears_in_no_output_at_all(tmp_path: Path, log_format: str,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    # Faults make error paths (and their messages) part of the run.
    settings = replace(FAST, error_rate=0.2, fail_rate=0.3, truncate_rate=0.2, fault_seed=3)
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)
    out = tmp_path / "out"
    with serve_in_thread(settings) as base_url:
        main(["run", str(manifest), "--base-url", base_url, "--out", str(out),
              "--api-key-file", str(key_file), "--log-format", log_format])
    captured = capsys.readouterr()
    assert API_KEY not in captured.out + captured.err
    assert API_KEY[4:] not in captured.out + captured.err
    for path in out.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    if log_format == "json":
        events = [json.loads(x) for x in captured.err.splitlines() if x.startswith("{")]
        assert events[0]["event"] == "start" and events[-1]["event"] == "finish"

