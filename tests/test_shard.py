"""--shard I/N: a pure predicate of the item key that splits a manifest exactly, run for real."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

import pytest
import yaml
from runner_helpers import check_run_directory, write_manifest

from batchflux.cli import build_parser, main
from batchflux.errors import UsageError
from batchflux.expand import expand_job
from batchflux.manifest import load_job
from batchflux.shard import Shard, filter_items, parse_shard, shard_of

ROOT = Path(__file__).resolve().parent.parent


def keys_of(manifest: Path) -> list[str]:
    return [item.key for item in expand_job(load_job(manifest))]


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_items_exactly(tmp_path: Path, count: int) -> None:
    manifest = write_manifest(tmp_path, prompts=10, seeds=10)  # 200 items
    items = list(expand_job(load_job(manifest)))
    seen: Counter[str] = Counter()
    sizes = []
    for index in range(count):
        part = [item.key for item in filter_items(iter(items), Shard(index, count))]
        sizes.append(len(part))
        seen.update(part)
    assert set(seen) == {item.key for item in items}
    assert all(n == 1 for n in seen.values())  # no item in two shards
    assert sum(sizes) == 200
    assert min(sizes) > 0  # 200 hashed keys: every shard gets work


def test_the_shard_of_an_item_depends_on_its_key_alone(tmp_path: Path) -> None:
    small = keys_of(write_manifest(tmp_path, prompts=3, seeds=2))
    grown = keys_of(write_manifest(tmp_path, prompts=6, seeds=2))  # the manifest grew
    assert set(small) < set(grown)
    for key in small:
        assert shard_of(key, 4) == int(key[:16], 16) % 4
        assert sum(parse_shard(f"{i}/4").contains(key) for i in range(4)) == 1


def test_no_shard_means_every_item() -> None:
    assert list(filter_items(iter([1, 2, 3]), None)) == [1, 2, 3]  # type: ignore[list-item]


@pytest.mark.parametrize("text", ["3/3", "-1/2", "a/b", "2", "1/0", ""])
def test_bad_shard_specs_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="I/N"):
        parse_shard(text)


def test_bad_shard_on_the_command_line_exits_2(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path)
    assert main(["run", str(manifest), "--sim", "--shard", "4/4",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--shard takes I/N" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_three_machines_run_one_manifest_and_merge_it_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=4, seeds=3)  # 24 items
    all_keys = set(keys_of(manifest))
    outs = [tmp_path / f"shard-{i}" for i in range(3)]
    for i, out in enumerate(outs):
        code = main(["run", str(manifest), "--sim", "--sim-job-seconds", "0.2", "-j", "8",
                     "--shard", f"{i}/3", "--out", str(out)])
        assert code == 0, capsys.readouterr()
    shard_keys = []
    for i, out in enumerate(outs):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["shard"] == f"{i}/3"
        records = check_run_directory(out, expected_items=summary["total_items"])
        keys = {r["key"] for r in records}
        assert all(shard_of(k, 3) == i for k in keys)
        shard_keys.append(keys)
    assert set().union(*shard_keys) == all_keys
    assert sum(len(k) for k in shard_keys) == len(all_keys)

    merged = tmp_path / "all"
    assert main(["merge", *map(str, outs), "--into", str(merged)]) == 0
    assert "24 items (24 ok, 0 failed)" in capsys.readouterr().out
    records = check_run_directory(merged, expected_items=24)
    assert {r["key"] for r in records} == all_keys


def test_the_kubernetes_indexed_job_example_runs_every_shard_once() -> None:
    doc = yaml.safe_load((ROOT / "jobs" / "deploy" / "k8s-indexed-job.yaml").read_text())
    spec = doc["spec"]
    assert doc["kind"] == "Job" and spec["completionMode"] == "Indexed"
    count = spec["completions"]
    assert spec["parallelism"] == count
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # backoffLimitPerIndex
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "job-completion-index" in env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "secretKeyRef" in env["APIFRAME_API_KEY"]["valueFrom"]  # no key in the manifest
    argv = [a.replace("$(SHARD_INDEX)", "2") for a in container["args"]]
    args = build_parser().parse_args(argv)
    assert container["command"] == ["batchflux"] and args.command == "run"
    assert parse_shard(args.shard) == Shard(2, count)
    assert args.out.endswith("shard-2")
    assert (ROOT / args.manifest).is_file()
    assert load_job(ROOT / args.manifest).entries


def test_the_merge_command_in_the_kubernetes_example_parses() -> None:
    text = (ROOT / "jobs" / "deploy" / "k8s-indexed-job.yaml").read_text()
    lines = [line.lstrip("# ").rstrip("\\").strip() for line in text.splitlines()
             if line.startswith("#   ")]
    argv = shlex.split(" ".join(lines))
    assert argv[0] == "batchflux"
    args = build_parser().parse_args(argv[1:])
    count = yaml.safe_load(text)["spec"]["completions"]
    assert args.command == "merge" and len(args.sources) == count
