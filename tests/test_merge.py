"""batchflux merge: lossless, deduplicated by key (ok beats failed), sha256-checked, atomic."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from runner_helpers import check_run_directory, load_results, write_manifest

from batchflux import batch
from batchflux.cli import main
from batchflux.config import Simulator
from batchflux.errors import IntegrityError
from batchflux.merge import MergeError, final_records, merge_runs
from batchflux.models import RunOptions
from batchflux.shard import Shard
from batchflux.sim import SimSettings

FAST = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="fast", credits=100_000)


async def run_shard(manifest: Path, out: Path, shard: Shard | None,
                    settings: SimSettings = FAST) -> dict[str, Any]:
    options = RunOptions(out_dir=out, shard=shard.label if shard is not None else None)
    result = await batch.run_batch_async(manifest, options,
                                         target=Simulator(settings=settings, job_seconds=0.2))
    return result.summary


@pytest.fixture
async def two_shards(tmp_path: Path) -> tuple[Path, list[Path]]:
    manifest = write_manifest(tmp_path, prompts=3, seeds=3, aspects=("1:1",))  # 9 items
    outs = [tmp_path / "s0", tmp_path / "s1"]
    for i, out in enumerate(outs):
        await run_shard(manifest, out, Shard(i, 2))
    return manifest, outs


def files_of(out: Path) -> dict[str, tuple[str, bytes]]:
    """key -> (sha256, image bytes) for every ok item of a run directory."""
    found = {}
    for record in load_results(out):
        if record["status"] == "ok":
            (f,) = record["files"]
            found[record["key"]] = (f["sha256"], (out / f["path"]).read_bytes())
    return found


async def test_merge_is_lossless_and_links_images(two_shards: tuple[Path, list[Path]],
                                                  tmp_path: Path) -> None:
    _, outs = two_shards
    into = tmp_path / "all"
    report = merge_runs(outs, into)
    expected = {**files_of(outs[0]), **files_of(outs[1])}
    assert len(expected) == 9 and report.items == 9 and report.ok == 9
    merged = files_of(into)
    assert merged == expected  # same keys, same sha256, same bytes
    for sha, data in merged.values():
        assert hashlib.sha256(data).hexdigest() == sha
    assert report.files_linked + report.files_copied == 9
    check_run_directory(into, expected_items=9)
    summary = json.loads((into / "summary.json").read_text())
    assert summary["counts"]["ok"] == 9
    assert summary["credits_spent"] == sum(
        r["credit_cost"] for o in outs for r in load_results(o))
    assert sorted(s["shard"] for s in summary["merged_from"]) == ["0/2", "1/2"]
    assert summary["manifest_sha256"]
    # The source files are untouched and the merged ones are whole files, not symlinks.
    assert files_of(outs[0]) and not any(p.is_symlink() for p in into.rglob("*"))


async def test_merging_again_is_idempotent(two_shards: tuple[Path, list[Path]],
                                           tmp_path: Path) -> None:
    _, outs = two_shards
    into = tmp_path / "all"
    merge_runs(outs, into)
    before = (into / "results.jsonl").read_bytes()
    again = merge_runs(outs, into)
    assert again.files_present == 9 and again.files_linked == again.files_copied == 0
    assert (into / "results.jsonl").read_bytes() == before


async def test_merge_can_grow_a_target_one_shard_at_a_time(
        two_shards: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, outs = two_shards
    into = tmp_path / "all"
    merge_runs([outs[0]], into)
    merge_runs([outs[1]], into)  # the target's own results take part
    assert len(final_records(into)) == 9


async def test_ok_beats_failed_for_the_same_key(two_shards: tuple[Path, list[Path]],
                                                tmp_path: Path) -> None:
    _, outs = two_shards
    failed_copy = tmp_path / "failed-copy"
    shutil.copytree(outs[0], failed_copy)
    lines = (failed_copy / "results.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record.update(status="failed", files=[], error={
        "category": "generation_failed", "message": "content policy", "retryable": False,
        "http_status": None})
    (failed_copy / "results.jsonl").write_text(json.dumps(record) + "\n")
    into = tmp_path / "all"
    # The failed line comes first and last: ok still wins.
    report = merge_runs([failed_copy, outs[0], outs[1], failed_copy], into)
    assert report.ok == 9 and report.failed == 0 and report.duplicates > 0
    assert final_records(into)[record["key"]].status == "ok"
    # A failure with no ok anywhere is kept, as a failure.
    only_failed = merge_runs([failed_copy], tmp_path / "only-failed")
    assert only_failed.failed == 1 and only_failed.ok == 0


async def test_runs_of_different_manifests_are_refused_unless_forced(
        two_shards: tuple[Path, list[Path]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, outs = two_shards
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = other_dir / "other.yaml"
    other.write_text("prompts:\n  - id: q\n    text: a different manifest\n")
    await run_shard(other, tmp_path / "o", None)
    into = tmp_path / "all"
    with pytest.raises(MergeError, match=r"different manifests.*--force"):
        merge_runs([outs[0], tmp_path / "o"], into)
    assert not (into / "results.jsonl").exists()
    assert main(["merge", str(outs[0]), str(tmp_path / "o"), "--into", str(into)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["merge", str(outs[0]), str(tmp_path / "o"), "--into", str(into),
                 "--force"]) == 0
    assert len(final_records(into)) == len(final_records(outs[0])) + 1


async def test_a_corrupt_source_image_fails_the_merge_and_keeps_the_old_target(
        two_shards: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, outs = two_shards
    into = tmp_path / "all"
    merge_runs([outs[0]], into)
    before = (into / "results.jsonl").read_bytes()
    victim = next(r for r in load_results(outs[1]) if r["status"] == "ok")["files"][0]
    path = outs[1] / victim["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256") as caught:
        merge_runs([outs[1]], into)
    assert caught.value.exit_code == 65
    message = str(caught.value)
    assert str(path) in message and json.dumps(victim["sha256"][:12]).strip('"') in message
    assert (into / "results.jsonl").read_bytes() == before
    assert not list(into.rglob("*.merge"))


async def test_a_result_line_cannot_point_outside_images(two_shards: tuple[Path, list[Path]],
                                                         tmp_path: Path) -> None:
    _, outs = two_shards
    evil = tmp_path / "evil"
    shutil.copytree(outs[0], evil)
    record = json.loads((evil / "results.jsonl").read_text().splitlines()[0])
    record["files"][0]["path"] = "images/../../../etc/passwd"
    (evil / "results.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(MergeError, match="outside"):
        merge_runs([evil], tmp_path / "all")


def test_merge_needs_run_directories(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["merge", str(tmp_path / "empty"), "--into", str(tmp_path / "x")]) == 2
