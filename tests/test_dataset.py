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
from batchflux.config import Simulator
from batchflux.dataset import export_dataset
from batchflux.models import RunOptions
from batchflux.sim import SimSettings

FAST = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="fast", credits=100_000)

@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)  # 12 items, 1:1 and 16:9
    out = tmp_path / "out"
    result = batch.run_batch(manifest, RunOptions(out_dir=out),
                             target=Simulator(settings=FAST, job_seconds=0.2))
    assert result.exit_code == 0
    return out


def test_hf_imagefolder_loads_with_the_datasets_library(finished_run: Path,
                                                              tmp_path: Path) -> None:
    import datasets  # noqa: F401  (the test extras install it; the load runs in a child)
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
    import webdataset as wds  # the test extras install it
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
    await batch.run_batch_async(manifest, RunOptions(out_dir=out),
                                target=Simulator(settings=failing, job_seconds=0.2))
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


# ------------------------------------------------------------------ meta columns (issue 13.7)

LOAD_HF_META = """
import json, sys
from datasets import load_dataset
ds = load_dataset("imagefolder", data_dir=sys.argv[1], cache_dir=sys.argv[2], split="train")
rows = [{k: v for k, v in row.items() if k != "image"} | {"size": list(row["image"].size)}
        for row in ds]
print(json.dumps({"columns": ds.column_names, "rows": rows}))
"""


def hand_made_run(out: Path, items: list[tuple[str, str, dict[str, str] | None]]) -> Path:
    """A finished run directory written by hand: one ok item per (prompt id, prompt, meta),
    each with a real PNG; meta None writes a line without "meta" (as older runs did)."""
    import hashlib
    import uuid

    import jsonschema
    from runner_helpers import RESULT_SCHEMA

    lines = []
    for index, (prompt_id, prompt, meta) in enumerate(items):
        rel = f"images/{prompt_id}/{index}.png"
        image_path = out / rel
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (40 * index, 120, 200)).save(image_path)
        data = image_path.read_bytes()
        record = {
            "key": hashlib.sha256(prompt.encode()).hexdigest(), "index": index,
            "prompt_id": prompt_id, "status": "ok", "model": "flux-2-dev", "prompt": prompt,
            "template": None, "seed": 100 + index,
            "params": {"aspect_ratio": "4:3", "seed": 100 + index, "output_format": "png"},
            "job_id": str(uuid.UUID(int=index + 1)), "submission": 0, "jobs": 1, "polls": 2,
            "credit_cost": 2, "error": None,
            "files": [{"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "width": 64,
                       "height": 48, "bytes": len(data), "format": "png"}],
            "timings": {"generating": 1.5, "downloading": 0.1, "total": 1.6},
            "started_at": "2026-11-28T14:41:05.031Z", "finished_at": "2026-11-28T14:41:06.631Z",
        }
        if meta is not None:
            record["meta"] = meta
        # A real result line: the runner writes "meta" on every line.
        jsonschema.validate(record, RESULT_SCHEMA, format_checker=jsonschema.FormatChecker())
        lines.append(json.dumps(record) + "\n")
    (out / "results.jsonl").write_text("".join(lines), encoding="utf-8")
    return out


CATALOGUE_ITEMS = [
    ("MUG-001", "a red ceramic mug on an oak table", {"sku": "MUG-001", "category": "kitchen"}),
    ("SNK-002", "a white canvas sneaker on concrete", {"sku": "SNK-002", "category": "shoes"}),
    ("p0003", "a lighthouse at dusk", None),  # a line from before meta existed
]


def test_hf_export_has_a_column_per_meta_name_and_loads_with_datasets(tmp_path: Path) -> None:
    import datasets  # noqa: F401  (the test extras install it; the load runs in a child)
    run = hand_made_run(tmp_path / "run", CATALOGUE_ITEMS)
    exported = export_dataset(run, "hf")
    assert exported.rows == 3
    proc = subprocess.run([sys.executable, "-c", LOAD_HF_META, str(exported.path),
                           str(tmp_path / "cache")], env=offline_env(tmp_path), check=False,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"image", "text", "seed", "sku", "category"} <= set(loaded["columns"])
    got = [(row["prompt_id"], row["text"], row["seed"], row["sku"], row["category"],
            row["size"]) for row in loaded["rows"]]
    assert got == [
        ("MUG-001", "a red ceramic mug on an oak table", 100, "MUG-001", "kitchen", [64, 48]),
        ("SNK-002", "a white canvas sneaker on concrete", 101, "SNK-002", "shoes", [64, 48]),
        ("p0003", "a lighthouse at dusk", 102, None, None, [64, 48]),
    ]


def test_webdataset_json_has_a_field_per_meta_name(tmp_path: Path) -> None:
    import webdataset as wds  # the test extras install it
    run = hand_made_run(tmp_path / "run", CATALOGUE_ITEMS)
    exported = export_dataset(run, "webdataset")
    urls = [str(t) for t in sorted(exported.path.glob("shard-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    got = [(s["json"]["prompt_id"], s["json"]["sku"], s["json"]["category"], s["txt"])
           for s in samples]
    assert got == [("MUG-001", "MUG-001", "kitchen", "a red ceramic mug on an oak table"),
                   ("SNK-002", "SNK-002", "shoes", "a white canvas sneaker on concrete"),
                   ("p0003", None, None, "a lighthouse at dusk")]


def test_a_meta_name_that_is_an_export_column_is_renamed_not_overwritten(tmp_path: Path) -> None:
    run = hand_made_run(tmp_path / "run", [
        ("MUG-001", "a red mug", {"model": "Classic 350 ml", "seed": "s-17", "sku": "MUG-001"}),
    ])
    exported = export_dataset(run, "hf")
    (row,) = [json.loads(line) for line in
              (exported.path / "train" / "metadata.jsonl").read_text().splitlines()]
    assert (row["model"], row["seed"]) == ("flux-2-dev", 100)  # ours, untouched
    assert (row["meta_model"], row["meta_seed"], row["sku"]) == ("Classic 350 ml", "s-17",
                                                                 "MUG-001")


def test_an_export_without_meta_has_exactly_the_columns_it_had(tmp_path: Path) -> None:
    from batchflux.dataset import OWN_COLUMNS

    run = hand_made_run(tmp_path / "run", [("p0001", "a fox", None), ("p0002", "an owl", {})])
    exported = export_dataset(run, "hf")
    rows = [json.loads(line) for line in
            (exported.path / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [set(row) for row in rows] == [set(OWN_COLUMNS)] * 2
