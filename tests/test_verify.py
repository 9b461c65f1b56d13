"""Defect 8 of issue 10, the post-run part: `batchflux verify OUT [--fix]` re-checks every image
of a run, and `export` / `merge` refuse a missing or different file (exit 65, naming the item
and the path) instead of crashing (exit 70) or shipping it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from runner_helpers import load_results, loopback, write_manifest

from batchflux import batch
from batchflux.cli import main
from batchflux.errors import IntegrityError
from batchflux.fileutil import sha256_file
from batchflux.models import RunOptions
from batchflux.sim import SimSettings, serve_in_thread
from batchflux.store import RESULTS_NAME, RunStore
from batchflux.verify import QUARANTINE_DIR, verify_run

FAST = SimSettings(job_seconds=0.05, queue_seconds=0.01, render_mode="fast", credits=100_000)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 12-item run against the simulator over loopback, every item ok."""
    base = tmp_path_factory.mktemp("verify")
    manifest = write_manifest(base, prompts=3, seeds=2)
    out = base / "out"
    with serve_in_thread(FAST) as base_url:
        result = batch.run_batch(manifest, RunOptions(out_dir=out), target=loopback(base_url))
    assert result.exit_code == 0
    return out


@pytest.fixture
def run_dir(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def ok_records(out: Path) -> list[dict[str, Any]]:
    return [r for r in load_results(out) if r["status"] == "ok"]


def rewrite_line(out: Path, key: str, **changes: Any) -> None:
    lines = (out / RESULTS_NAME).read_text().splitlines()
    for n, line in enumerate(lines):
        record = json.loads(line)
        if record["key"] == key:
            record["files"][0].update(changes)
            lines[n] = json.dumps(record)
    (out / RESULTS_NAME).write_text("\n".join(lines) + "\n")


def test_a_clean_run_verifies_and_exits_0(run_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        (f"batchflux: verify {run_dir}: 12 items, 12 files checked: every file matches its "
         "result line")]
    report = verify_run(run_dir)
    assert report.ok and report.items == 12 and report.files == 12


def test_every_kind_of_damage_is_named_with_item_and_path(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = ok_records(run_dir)
    missing, short, flipped, garbage, outside = records[:5]

    (run_dir / missing["files"][0]["path"]).unlink()
    path = run_dir / short["files"][0]["path"]
    path.write_bytes(path.read_bytes()[:-10])
    path = run_dir / flipped["files"][0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # A file recorded with its own sha256 and size that is no image at all.
    path = run_dir / garbage["files"][0]["path"]
    path.write_bytes(b"not an image at all")
    rewrite_line(run_dir, garbage["key"], sha256=sha256_file(path), bytes=19)
    rewrite_line(run_dir, outside["key"], path="images/../../../etc/passwd")

    assert main(["verify", str(run_dir)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6, lines

    def line_of(record: dict[str, Any]) -> str:
        (found,) = [ln for ln in lines if f"[{record['key'][:12]}]" in ln]
        return found

    assert line_of(missing).startswith(f"{run_dir}/{missing['files'][0]['path']}: missing; item ")
    assert f"{short['files'][0]['path']}: size differs (recorded " in line_of(short)
    assert f"{flipped['files'][0]['path']}: sha256 differs (recorded " in line_of(flipped)
    assert f"{garbage['files'][0]['path']}: does not decode (" in line_of(garbage)
    assert "images/../../../etc/passwd: path outside images/" in line_of(outside)
    assert f"item {missing['prompt_id']} {missing['params']['aspect_ratio']} seed " \
           f"{missing['seed']} [" in line_of(missing)
    assert lines[-1] == (
        f"batchflux: verify {run_dir}: 12 items, 12 files checked: 5 problems (1 does not "
        "decode, 1 missing, 1 path outside images/, 1 sha256 differs, 1 size differs); "
        f"`batchflux verify {run_dir} --fix` moves the bad files aside")


def test_fix_moves_bad_files_to_the_quarantine_and_deletes_nothing(run_dir: Path) -> None:
    records = ok_records(run_dir)
    bad, gone = records[0], records[1]
    bad_rel = bad["files"][0]["path"]
    data = bytearray((run_dir / bad_rel).read_bytes())
    data[-20] ^= 0x01
    (run_dir / bad_rel).write_bytes(bytes(data))
    (run_dir / gone["files"][0]["path"]).unlink()

    report = verify_run(run_dir, fix=True)
    assert not report.ok and report.fixed
    assert report.quarantined == (f"{QUARANTINE_DIR}/{bad_rel}",)
    assert not (run_dir / bad_rel).exists()
    assert (run_dir / QUARANTINE_DIR / bad_rel).read_bytes() == bytes(data)
    # What is left is exactly what a run must fetch again: two missing files, nothing else.
    again = verify_run(run_dir)
    assert sorted((p.kind, p.path) for p in again.problems) == sorted(
        [("missing", bad_rel), ("missing", gone["files"][0]["path"])])
    # A second --fix of the same file keeps both quarantined copies.
    (run_dir / bad_rel).write_bytes(b"junk")
    verify_run(run_dir, fix=True)
    assert (run_dir / QUARANTINE_DIR / f"{bad_rel}.1").read_bytes() == b"junk"
    assert (run_dir / QUARANTINE_DIR / bad_rel).read_bytes() == bytes(data)


def test_a_file_two_items_claim_is_not_moved_when_one_matches(run_dir: Path) -> None:
    records = ok_records(run_dir)
    first = records[0]
    second = next(r for r in records[1:]  # an item whose own image differs from first's
                  if r["files"][0]["sha256"] != first["files"][0]["sha256"])
    # Defect 5's damage: a later item written over an earlier item's image.
    rewrite_line(run_dir, second["key"], path=first["files"][0]["path"])
    report = verify_run(run_dir, fix=True)
    problems = [(p.key, p.kind) for p in report.problems]
    assert (second["key"], "size") in problems or (second["key"], "sha256") in problems
    assert all(key != first["key"] for key, _ in problems)
    assert report.quarantined == ()
    assert (run_dir / first["files"][0]["path"]).is_file()


def test_fix_waits_for_no_run(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = RunStore(run_dir, filename_template="{key}.{ext}")
    store.open()
    try:
        assert main(["verify", str(run_dir), "--fix"]) == 75
        assert "in use by another batchflux run" in capsys.readouterr().err
    finally:
        store.close()


def test_verify_of_something_else_is_a_usage_error(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a batchflux run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# export and merge refuse what does not match


def swap_in_another_image(out: Path) -> dict[str, Any]:
    """Replace one ok image by another valid image (of another item): it still decodes.

    The simulator's flat images repeat for items of one size and seed, so the other item is
    one whose image differs (a copy of identical bytes would change nothing)."""
    records = ok_records(out)
    victim = records[0]
    other = next(r for r in records[1:]
                 if r["files"][0]["sha256"] != victim["files"][0]["sha256"])
    shutil.copyfile(out / other["files"][0]["path"], out / victim["files"][0]["path"])
    with Image.open(out / victim["files"][0]["path"]) as im:
        im.load()
    return victim


@pytest.mark.parametrize("fmt", ["hf", "webdataset"])
def test_export_refuses_a_replaced_image_naming_item_and_path(
        run_dir: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--dataset", fmt]) == 0
    before = sorted(p.name for p in (run_dir / "dataset" / fmt).rglob("*"))
    capsys.readouterr()
    victim = swap_in_another_image(run_dir)
    assert main(["export", str(run_dir), "--dataset", fmt]) == 65
    err = capsys.readouterr().err
    assert f"[{victim['key'][:12]}]" in err
    assert str(run_dir / victim["files"][0]["path"]) in err
    assert "does not match the sha256" in err
    # The previous export is left whole.
    assert sorted(p.name for p in (run_dir / "dataset" / fmt).rglob("*")) == before


@pytest.mark.parametrize("fmt", ["hf", "webdataset"])
def test_export_refuses_a_missing_image_with_65_not_70(
        run_dir: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    victim = ok_records(run_dir)[3]
    (run_dir / victim["files"][0]["path"]).unlink()
    assert main(["export", str(run_dir), "--dataset", fmt]) == 65
    err = capsys.readouterr().err
    assert f"[{victim['key'][:12]}]" in err and "but missing" in err
    assert str(run_dir / victim["files"][0]["path"]) in err
    assert "internal error" not in err


def test_merge_refuses_a_missing_or_replaced_image(run_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    victim = swap_in_another_image(run_dir)
    assert main(["merge", str(run_dir), "--into", str(tmp_path / "m1")]) == 65
    err = capsys.readouterr().err
    assert f"[{victim['key'][:12]}]" in err and str(run_dir / victim["files"][0]["path"]) in err
    (run_dir / victim["files"][0]["path"]).unlink()
    with pytest.raises(IntegrityError, match="but missing") as caught:
        from batchflux.merge import merge_runs

        merge_runs([run_dir], tmp_path / "m2")
    assert victim["key"][:12] in str(caught.value)
    assert not (tmp_path / "m2" / RESULTS_NAME).exists()


def test_the_docs_show_verify() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "batchflux verify OUT [--fix]" in readme
    reliability = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    for name in ("test_every_kind_of_damage_is_named_with_item_and_path",
                 "test_fix_moves_bad_files_to_the_quarantine_and_deletes_nothing"):
        assert name in reliability and name in globals()
