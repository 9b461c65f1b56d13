"""--dataset hf|webdataset: exports read back by the real ``datasets`` and ``webdataset``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from runner_helpers import LOAD_HF, load_results, offline_env, write_manifest

from batchflux import batch
from batchflux.cli import main
from batchflux.dataset import export_dataset
from batchflux.sim import SimSettings

FAST = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="fast", credits=100_000)

@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)  # 12 items, 1:1 and 16:9
    out = tmp_path / "out"
    result = batch.run_batch(manifest, out_dir=out, sim=FAST, sim_job_seconds=0.2)
    assert result.exit_code == 0
    return out


def test_hf_imagefolder_loads_with_the_datasets_library(finished_run: Path,
                                                              tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="the test extra 'datasets' is not installed")
    exported = export_dataset(finished_run, "hf")
    assert exported.rows == 12 and exported.path == finished_run / "dataset" / "hf"
    assert (exported.path / "train" / "metadata.jsonl").is_file()
    proc = subprocess.run([sys.executable, "-c", LOAD_HF, str(exported.path),
                           str(tmp_path / "cache")], env=offline_env(tmp_path), check=False,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"image", "text", "seed", "params", "key"} <= set(loaded["columns"])
    results = {r["key"]: r for r in load_results(finished_run)}
    assert len(loaded["rows"]) == 12
    assert {row["key"] for row in loaded["rows"]} == set(results)
    for row in loaded["rows"]:
        record = results[row["key"]]
        assert row["text"] == record["prompt"]  # the caption is the resolved prompt
        assert row["seed"] == record["seed"]
        assert json.loads(row["params"]) == record["params"]
        assert row["size"] == [record["files"][0]["width"], record["files"][0]["height"]]
        assert row["size"] == [row["width"], row["height"]]


def test_webdataset_shards_read_back_with_the_webdataset_package(
        finished_run: Path) -> None:
    wds = pytest.importorskip("webdataset",
                              reason="the test extra 'webdataset' is not installed")
    exported = export_dataset(finished_run, "webdataset", shard_size=5)
    tars = sorted(exported.path.glob("shard-*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar",
                                      "shard-000002.tar"]
    assert exported.shards == 3 and exported.rows == 12
    results = {r["key"]: r for r in load_results(finished_run)}
    urls = [str(t) for t in tars]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 12
    for sample in samples:
        record = results[sample["__key__"]]
        image_key = next(k for k in ("jpg", "png", "webp") if k in sample)
        image = sample[image_key]
        assert isinstance(image, Image.Image)
        assert list(image.size) == [record["files"][0]["width"], record["files"][0]["height"]]
        assert sample["txt"] == record["prompt"]
        assert sample["json"]["seed"] == record["seed"]
        assert json.loads(sample["json"]["params"]) == record["params"]


def test_export_is_rerunnable_and_replaces_the_old_export(finished_run: Path) -> None:
    first = export_dataset(finished_run, "hf")
    stale = first.path / "train" / "stale.txt"
    stale.write_text("left by an older export")
    again = export_dataset(finished_run, "hf")
    assert again.rows == 12 and not stale.exists()
    lines = (again.path / "train" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 12
    for line in lines:
        row = json.loads(line)
        with Image.open(again.path / "train" / row["file_name"]) as im:
            assert im.size == (row["width"], row["height"])
    leftovers = [p.name for p in (finished_run / ".batchflux").iterdir()
                 if p.name.startswith("export-")]
    assert leftovers == []
    assert not list((finished_run / "dataset").glob(".*old*"))


async def test_failed_items_are_not_exported(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=3, aspects=("1:1",))  # 12 items
    out = tmp_path / "out"
    failing = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="fast",
                          fail_rate=0.5, fail_capacity_share=0.0, fault_seed=3)
    await batch.run_batch_async(manifest, out_dir=out, sim=failing, sim_job_seconds=0.2)
    records = load_results(out)
    ok = {r["key"] for r in records if r["status"] == "ok"}
    assert 0 < len(ok) < 12
    exported = export_dataset(out, "hf")
    rows = [json.loads(line) for line in
            (exported.path / "train" / "metadata.jsonl").read_text().splitlines()]
    assert {row["key"] for row in rows} == ok


def test_run_dataset_flag_and_export_command(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=1, aspects=("1:1",))
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--sim", "--sim-job-seconds", "0.2", "--out", str(out),
                 "--dataset", "webdataset", "-q"]) == 0
    assert (out / "dataset" / "webdataset" / "shard-000000.tar").is_file()
    assert main(["export", str(out), "--dataset", "hf"]) == 0
    assert "2 images" in capsys.readouterr().out
    assert (out / "dataset" / "hf" / "train" / "metadata.jsonl").is_file()
    assert main(["export", str(tmp_path), "--dataset", "hf"]) == 2  # not a run directory
