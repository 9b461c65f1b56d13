"""Issue 13, point 5: results of items the manifest no longer has stay in the run directory, but
reports, exports and the review app default to the items of the current manifest, count the
others as "not in the manifest", and include them with --all.

Every run here is a real run over the in-process simulator. The first reproduces the report:
54 items (2 products x 3 backgrounds x 3 aspect ratios x 3 seeds), then one background text
edited: the re-run pays for 18 new items, and the run directory holds 72 results for a 54-item
manifest.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from runner_helpers import inprocess, load_results

from batchflux import batch
from batchflux.cli import main
from batchflux.dataset import export_dataset
from batchflux.errors import EXIT_DATAERR, RunDirectoryError
from batchflux.merge import merge_runs
from batchflux.models import RunOptions
from batchflux.report import build_report
from batchflux.results import split_by_manifest
from batchflux.reviewapp import append_decision, create_app
from batchflux.sim import SimSettings, serve_in_thread
from batchflux.sim import create_app as sim_app
from batchflux.store import ITEM_KEYS_NAME, STATE_DIR

FAST = SimSettings(job_seconds=0.05, queue_seconds=0.0, render_mode="fast", credits=100_000)

OLD_BACKGROUND = "a grey slate tile"
NEW_BACKGROUND = "a black marble slab"
MANIFEST = """\
version: 1
defaults:
  output_format: png
vars:
  background:
    - a white studio backdrop
    - a warm oak counter
    - {background}
grid:
  aspect_ratio: ["1:1", "4:5", "16:9"]
  seeds: {{count: 3, start: 1}}
prompts:
  - id: mug
    text: "a red ceramic mug on {{background}}"
  - id: vase
    text: "a blue glass vase on {{background}}"
"""


def write(manifest: Path, background: str = OLD_BACKGROUND) -> Path:
    manifest.write_text(MANIFEST.format(background=background), encoding="utf-8")
    return manifest


def run(manifest: Path, out: Path, app: Any, **options: Any) -> int:
    result = batch.run_batch(manifest, RunOptions(out_dir=out, **options),
                             target=inprocess(app))
    return int(result.exit_code)


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's run directory: 54 items run, one background edited, run again."""
    base = tmp_path_factory.mktemp("membership")
    manifest = write(base / "photos.yaml")
    out = base / "out"
    app = sim_app(FAST)
    assert run(manifest, out, app) == 0
    assert len(load_results(out)) == 54
    write(manifest, NEW_BACKGROUND)
    assert run(manifest, out, app) == 0
    assert app.state.sim.counters.jobs_created == 72  # 18 new items paid, nothing twice
    return out


@pytest.fixture
def out(edited_run: Path, tmp_path: Path) -> Path:
    """A private copy of the edited run (tests change it)."""
    copy = tmp_path / "out"
    shutil.copytree(edited_run, copy)
    return copy


def stale_keys(out: Path) -> set[str]:
    """The keys of the results made for the old background text: the 18 stale ones."""
    keys = {r["key"] for r in load_results(out) if OLD_BACKGROUND in r["prompt"]}
    assert len(keys) == 18
    return keys


def report_json(out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert main(["report", str(out), "--json", *extra]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def exported_keys(out: Path) -> list[str]:
    lines = (out / "dataset" / "hf" / "train" / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line)["key"] for line in lines]


# --------------------------------------------------------------------------------------------
# report, report --json, report --html


def test_report_json_counts_the_manifest_and_the_others_apart(
        out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = report_json(out, capsys)
    assert report["items"] == 54 and report["by_status"] == {"ok": 54}
    assert report["not_in_manifest"] == 18 and report["all"] is False
    assert report["images"] == 54 and report["credits_spent"] == 54 * 2

    everything = report_json(out, capsys, "--all")
    assert everything["items"] == 72 and everything["by_status"] == {"ok": 72}
    assert everything["not_in_manifest"] == 18 and everything["all"] is True
    assert everything["images"] == 72


def test_the_table_says_how_many_are_not_in_the_manifest(
        out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "54 ok" in table and "72 ok" not in table
    assert "18 results not in the manifest (hidden; --all shows them)" in table

    assert main(["report", str(out), "--all"]) == 0
    table = capsys.readouterr().out
    assert "72 ok" in table
    assert "18 results not in the manifest (shown with --all, marked as such)" in table


def figures(page: str) -> list[str]:
    return [chunk.split(">", 1)[0] for chunk in page.split("<section class=view id=sheet>")[1]
            .split("<figure")[1:]]


def test_the_html_page_shows_the_manifest_and_marks_the_others_with_all(
        out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = stale_keys(out)
    assert main(["report", str(out), "--html"]) == 0
    captured = capsys.readouterr()
    assert "54 images" in captured.out
    assert "18 results not in the manifest (hidden; --all shows them)" in captured.err
    page = (out / "review" / "index.html").read_text()
    shown = figures(page)
    assert len(shown) == 54 and not any(key in page for key in old)
    assert "not in the manifest" in page  # the stats line counts them

    assert main(["report", str(out), "--html", "--all"]) == 0
    page = (out / "review" / "index.html").read_text()
    shown = figures(page)
    assert len(shown) == 72
    marked = {attrs.split("data-key=")[1] for attrs in shown if "stale" in attrs}
    assert marked == old
    sheet = page.split("<section class=view id=sheet>")[1]
    assert sheet.count("<span class=stale-note>not in the manifest</span>") == 18


# --------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("fmt", ["hf", "webdataset"])
def test_export_writes_the_manifest_rows_and_all_of_them_with_all(
        out: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    old = stale_keys(out)
    assert main(["export", str(out), "--dataset", fmt]) == 0
    captured = capsys.readouterr()
    assert "54 images" in captured.out
    assert "18 results not in the manifest (hidden; --all shows them)" in captured.err
    if fmt == "hf":
        keys = exported_keys(out)
        assert len(keys) == 54 and not old & set(keys)

    done = export_dataset(out, fmt, include_all=True)
    assert (done.rows, done.not_in_manifest) == (72, 18)
    if fmt == "hf":
        keys = exported_keys(out)
        assert len(keys) == 72 and old <= set(keys)


def test_a_run_with_dataset_exports_the_current_manifest(tmp_path: Path) -> None:
    manifest = write(tmp_path / "photos.yaml")
    out = tmp_path / "out"
    app = sim_app(FAST)
    assert run(manifest, out, app) == 0
    write(manifest, NEW_BACKGROUND)
    assert run(manifest, out, app, dataset="hf") == 0
    keys = exported_keys(out)
    assert len(keys) == 54
    assert not any(OLD_BACKGROUND in r["prompt"] for r in load_results(out)
                   if r["key"] in set(keys))


# --------------------------------------------------------------------------------------------
# what counts as in the manifest


def test_an_old_run_directory_without_the_keys_file_shows_everything(
        out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (out / STATE_DIR / ITEM_KEYS_NAME).unlink()  # as an older batchflux left it
    report = report_json(out, capsys)
    assert report["items"] == 72 and report["not_in_manifest"] == 0
    assert main(["report", str(out)]) == 0
    assert "not in the manifest" not in capsys.readouterr().out
    assert export_dataset(out, "hf").rows == 72
    split = split_by_manifest(out)
    assert (len(split.current), split.not_in_manifest, split.known) == (72, 0, False)


def test_a_reroll_of_a_current_item_counts_as_current(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write(tmp_path / "photos.yaml")
    out = tmp_path / "out"
    app = sim_app(FAST)
    assert run(manifest, out, app) == 0
    by_prompt = {r["key"]: r["prompt"] for r in load_results(out)}
    current = next(k for k, p in sorted(by_prompt.items()) if "oak" in p)
    doomed = next(k for k, p in sorted(by_prompt.items()) if OLD_BACKGROUND in p)
    append_decision(out, current, "reject")
    append_decision(out, doomed, "reject")
    assert run(manifest, out, app, reroll="rejected") == 0
    rerolls = {r["reroll_of"]: r["key"] for r in load_results(out) if r.get("reroll_of")}
    assert set(rerolls) == {current, doomed}

    # The rerolls' own keys are not among the items of a run without --reroll.
    write(manifest, NEW_BACKGROUND)
    assert run(manifest, out, app) == 0
    split = split_by_manifest(out)
    current_keys = {r.key for r in split.current}
    assert rerolls[current] in current_keys and current in current_keys
    # The reroll of an item the manifest no longer has goes with its original.
    assert {rerolls[doomed], doomed} <= split.stale_keys()
    report = report_json(out, capsys)
    assert (report["items"], report["not_in_manifest"]) == (54 + 1, 18 + 1)


def test_a_hand_written_line_with_a_key_batchflux_never_makes_is_not_in_the_manifest(
        out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = {**load_results(out)[0], "key": "not-a-hex-key", "reroll_of": "neither"}
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
    report = report_json(out, capsys)
    assert (report["items"], report["not_in_manifest"]) == (54, 19)


# --------------------------------------------------------------------------------------------
# a damaged keys file


@pytest.mark.parametrize("damage", ["cut", "shuffled", "directory"])
def test_a_damaged_keys_file_is_a_clear_error_naming_it(
        out: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = out / STATE_DIR / ITEM_KEYS_NAME
    raw = path.read_bytes()
    if damage == "cut":
        path.write_bytes(raw[:-3])
    elif damage == "shuffled":
        path.write_bytes(raw[8:16] + raw[:8] + raw[16:])
    else:
        path.unlink()
        path.mkdir()
    for argv in (["report", str(out)], ["report", str(out), "--json"],
                 ["export", str(out), "--dataset", "hf"],
                 ["merge", str(out), "--into", str(out.parent / "merged")]):
        assert main(argv) == EXIT_DATAERR, argv
        err = capsys.readouterr().err
        assert str(path) in err and ("damaged" in err or "cannot be read" in err), err
        assert "Traceback" not in err and "internal error" not in err
    assert not (out.parent / "merged" / "results.jsonl").exists()
    with pytest.raises(RunDirectoryError, match=ITEM_KEYS_NAME):
        create_app(out)
    # verify checks every file whatever the manifest: the keys do not matter to it.
    assert main(["verify", str(out)]) == 0
    assert "72 items" in capsys.readouterr().out


def test_verify_keeps_checking_every_result(out: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    stale = next(r for r in load_results(out) if OLD_BACKGROUND in r["prompt"])
    (out / stale["files"][0]["path"]).unlink()
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "72 items" in printed and stale["files"][0]["path"] in printed


# --------------------------------------------------------------------------------------------
# merge


def test_merge_keeps_everything_warns_and_the_merged_directory_knows_the_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write(tmp_path / "photos.yaml")
    app = sim_app(FAST)
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        assert run(manifest, shard, app, shard=f"{i}/2") == 0
    write(manifest, NEW_BACKGROUND)
    for i, shard in enumerate(shards):
        assert run(manifest, shard, app, shard=f"{i}/2") == 0
    merged = tmp_path / "merged"
    assert main(["merge", *map(str, shards), "--into", str(merged)]) == 0
    captured = capsys.readouterr()
    assert "72 items" in captured.out
    assert "18 merged results not in the manifest" in captured.err
    assert len(load_results(merged)) == 72  # nothing dropped
    report = report_json(merged, capsys)
    assert (report["items"], report["not_in_manifest"]) == (54, 18)
    assert report_json(merged, capsys, "--all")["items"] == 72
    assert merge_runs(shards, tmp_path / "again").not_in_manifest == 18

    # A source without the record (an older batchflux): every item of the merge counts.
    (shards[1] / STATE_DIR / ITEM_KEYS_NAME).unlink()
    assert merge_runs(shards, merged).not_in_manifest == 0
    assert not (merged / STATE_DIR / ITEM_KEYS_NAME).exists()
    report = report_json(merged, capsys)
    assert (report["items"], report["not_in_manifest"]) == (72, 0)


# --------------------------------------------------------------------------------------------
# the review app


@pytest.fixture
def served(out: Path) -> Iterator[tuple[str, str]]:
    with serve_in_thread(app=create_app(out)) as plain, \
            serve_in_thread(app=create_app(out, include_all=True)) as everything:
        yield plain, everything


def test_the_review_app_shows_the_manifest_and_with_all_marks_the_others(
        out: Path, served: tuple[str, str]) -> None:
    plain, everything = served
    old = stale_keys(out)
    data = httpx.get(f"{plain}/api/run").json()
    assert len(data["items"]) == 54 and not any(item["stale"] for item in data["items"])
    assert not old & {item["key"] for item in data["items"]}
    assert data["run"]["not_in_manifest"] == 18
    assert data["run"]["note"] == "18 results not in the manifest (hidden; --all shows them)"
    hidden = sorted(old)[0]
    answer = httpx.post(f"{plain}/api/decisions", json={"key": hidden, "decision": "accept"})
    assert answer.status_code == 400  # a hidden item is not decided on
    path = next(r["files"][0]["path"] for r in load_results(out) if r["key"] == hidden)
    assert httpx.get(f"{plain}/files/{path}").status_code == 404

    data = httpx.get(f"{everything}/api/run").json()
    assert len(data["items"]) == 72 and data["run"]["all"] is True
    assert {item["key"] for item in data["items"] if item["stale"]} == old
    assert httpx.get(f"{everything}/files/{path}").status_code == 200


def test_the_review_app_follows_a_run_that_only_removed_items(tmp_path: Path) -> None:
    """A manifest shortened (one background gone) adds no result: the app still notices."""
    manifest = write(tmp_path / "photos.yaml")
    out = tmp_path / "out"
    app = sim_app(FAST)
    assert run(manifest, out, app) == 0
    with serve_in_thread(app=create_app(out)) as base:
        assert len(httpx.get(f"{base}/api/run").json()["items"]) == 54
        results = (out / "results.jsonl").read_bytes()
        manifest.write_text(MANIFEST.format(background="x").replace("    - x\n", ""))
        assert run(manifest, out, app) == 0
        assert (out / "results.jsonl").read_bytes() == results  # nothing new to record
        data = httpx.get(f"{base}/api/run").json()
    assert len(data["items"]) == 36 and data["run"]["not_in_manifest"] == 18
    assert build_report(out)["items"] == 36
