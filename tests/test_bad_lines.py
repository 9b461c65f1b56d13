"""Defect 6 of issue 10: a garbage or blank line in the middle of results.jsonl (or the journal)
never hides the lines after it. Readers skip it with a warning naming the file and line; every
good line counts; repair only ever cuts an unterminated last fragment."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import pytest
from runner_helpers import loopback, write_manifest

from batchflux import batch
from batchflux.cli import main
from batchflux.merge import merge_runs
from batchflux.models import RunOptions
from batchflux.report import build_report
from batchflux.sim import SimSettings, serve_in_thread
from batchflux.store import (
    JOURNAL_NAME,
    RESULTS_NAME,
    STATE_DIR,
    BadLine,
    ResumeIndex,
    RunStore,
    iter_jsonl,
    repair_jsonl,
)

FAST = SimSettings(job_seconds=0.05, queue_seconds=0.01, render_mode="fast", credits=100_000)
GARBAGE = b'{"key": "this line was cut by a bad editor\n'


@pytest.fixture(scope="module")
def finished_120(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 120-item run against the simulator over loopback (all ok)."""
    base = tmp_path_factory.mktemp("bad-lines")
    manifest = write_manifest(base, prompts=10, seeds=6)  # 10 x 6 x 2 aspect ratios
    out = base / "out"
    with serve_in_thread(FAST) as base_url:
        result = batch.run_batch(manifest, RunOptions(out_dir=out), target=loopback(base_url))
    assert result.exit_code == 0
    assert (out / RESULTS_NAME).read_bytes().count(b"\n") == 120
    return out


def spoil(out: Path) -> tuple[int, int]:
    """Put a garbage line after line 40 and a blank line after line 80 of results.jsonl.
    Returns their line numbers (1-based) in the spoiled file."""
    lines = (out / RESULTS_NAME).read_bytes().splitlines(keepends=True)
    assert len(lines) == 120
    spoiled = lines[:40] + [GARBAGE] + lines[40:80] + [b"\n"] + lines[80:]
    (out / RESULTS_NAME).write_bytes(b"".join(spoiled))
    return 41, 82


@pytest.fixture
def spoiled(finished_120: Path, tmp_path: Path) -> tuple[Path, tuple[int, int]]:
    out = tmp_path / "out"
    shutil.copytree(finished_120, out)
    return out, spoil(out)


def test_report_counts_every_good_line_and_warns_with_line_numbers(
        spoiled: tuple[Path, tuple[int, int]], capsys: pytest.CaptureFixture[str]) -> None:
    out, (garbage, blank) = spoiled
    assert main(["report", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["items"] == 120 and report["by_status"] == {"ok": 120}
    assert report["images"] == 120
    results = out / RESULTS_NAME
    assert [(b["file"], b["line"]) for b in report["bad_lines"]] == [
        (str(results), garbage), (str(results), blank)]
    assert f"{results}:{garbage}: " in captured.err
    assert f"{results}:{blank}: blank line" in captured.err
    assert build_report(out)["items"] == 120  # the library agrees


def test_merge_merges_every_good_line_and_warns(spoiled: tuple[Path, tuple[int, int]],
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, (garbage, blank) = spoiled
    into = tmp_path / "merged"
    assert main(["merge", str(out), "--into", str(into)]) == 0
    captured = capsys.readouterr()
    assert "120 items (120 ok, 0 failed)" in captured.out
    assert f"{out / RESULTS_NAME}:{garbage}: " in captured.err
    assert f"{out / RESULTS_NAME}:{blank}: blank line" in captured.err
    merged = [r for _, r in iter_jsonl(into / RESULTS_NAME)]
    assert len(merged) == 120 and all(r["status"] == "ok" for r in merged)
    report = merge_runs([out], tmp_path / "again")
    assert report.items == 120
    assert [(b.line, b.file) for b in report.bad_lines] == [
        (garbage, str(out / RESULTS_NAME)), (blank, str(out / RESULTS_NAME))]


def test_export_exports_every_good_line_and_warns(spoiled: tuple[Path, tuple[int, int]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, (garbage, _) = spoiled
    assert main(["export", str(out), "--dataset", "hf"]) == 0
    captured = capsys.readouterr()
    assert "120 images" in captured.out
    assert f"{out / RESULTS_NAME}:{garbage}: " in captured.err
    rows = (out / "dataset" / "hf" / "train" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 120


def test_a_resumed_run_does_not_redo_the_items_after_a_bad_line(
        spoiled: tuple[Path, tuple[int, int]], tmp_path: Path) -> None:
    out, _ = spoiled
    manifest = write_manifest(tmp_path, prompts=10, seeds=6)
    before = (out / RESULTS_NAME).read_bytes()
    app_settings = FAST
    with serve_in_thread(app_settings) as base_url:
        result = batch.run_batch(manifest, RunOptions(out_dir=out), target=loopback(base_url))
        stats = httpx.get(f"{base_url}/_sim/stats").json()
    assert result.exit_code == 0
    assert stats["jobs_created"] == 0 and stats["idempotent_replays"] == 0, stats
    # Nothing redone, nothing cut: the bad lines stay (skipped), every good line stays.
    assert (out / RESULTS_NAME).read_bytes() == before
    index_store = RunStore(out, filename_template="{key}.{ext}")
    index = index_store.open()
    try:
        assert index.ok_count == 120
        assert [(Path(b.file).name, b.line) for b in index.bad_lines] == [
            (RESULTS_NAME, 41), (RESULTS_NAME, 82)]
    finally:
        index_store.close()


# --------------------------------------------------------------------------------------------
# The readers and the repair on their own


def _key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _ok(n: int) -> bytes:
    # The runner's own shape (key, index, prompt_id, status first): the fast path.
    return (json.dumps({"key": _key(n), "index": n, "prompt_id": f"p{n}", "status": "ok",
                        "files": []}, separators=(",", ":")) + "\n").encode()


def test_a_bad_line_in_the_middle_is_never_repaired_away(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_NAME
    body = _ok(1) + b"\0\0\0 not json\n" + _ok(2) + b"\n" + _ok(3)
    path.write_bytes(body)
    assert repair_jsonl(path) is False
    assert path.read_bytes() == body
    bad: list[BadLine] = []
    assert [r["index"] for _, r in iter_jsonl(path, on_bad_line=bad.append)] == [1, 2, 3]
    assert [(b.line, b.reason) for b in bad] == [(2, "not valid JSON"), (4, "blank line")]
    assert str(bad[1]) == f"{path}:4: blank line; line skipped"


def test_repair_cuts_only_an_unterminated_last_fragment(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_NAME
    path.write_bytes(_ok(1) + b"garbage\n" + _ok(2) + b'{"key":"ab')
    assert repair_jsonl(path) is True
    assert path.read_bytes() == _ok(1) + b"garbage\n" + _ok(2)
    assert repair_jsonl(path) is False


def test_an_unterminated_last_line_that_is_whole_json_is_kept(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_NAME
    path.write_bytes(_ok(1) + _ok(2).rstrip(b"\n"))  # e.g. saved by an editor
    assert repair_jsonl(path) is True
    assert path.read_bytes() == _ok(1) + _ok(2)


def test_the_resume_index_skips_bad_lines_in_results_and_journal(tmp_path: Path) -> None:
    (tmp_path / STATE_DIR).mkdir()
    failed = {"key": _key(3), "status": "failed", "submission": 0,
              "error": {"category": "server_error", "retryable": True}}
    (tmp_path / RESULTS_NAME).write_bytes(
        _ok(1) + b"[1, 2]\n" + b"\n" + _ok(2) + b"{broken\n"
        + (json.dumps(failed) + "\n").encode() + _ok(4))
    (tmp_path / STATE_DIR / JOURNAL_NAME).write_bytes(
        b'{"t":"intent","key":"' + _key(5).encode() + b'","n":0}\n'
        b"#?!\n"
        b'{"t":"job","key":"' + _key(6).encode() + b'","n":0,"job_id":"j6"}\n')
    index = ResumeIndex.load(tmp_path, check_files=False)  # the lines name no real files
    assert index.ok_count == 3 and all(index.is_ok(_key(n)) for n in (1, 2, 4))
    assert index.prior_failure(_key(3)) is not None
    intent = index.journaled_intent(_key(5))
    assert intent is not None and intent.submission == 0
    assert index.journaled_job(_key(6)) == (0, "j6")
    assert [(Path(b.file).name, b.line) for b in index.bad_lines] == [
        (RESULTS_NAME, 2), (RESULTS_NAME, 3), (RESULTS_NAME, 5), (JOURNAL_NAME, 2)]
