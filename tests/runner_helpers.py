"""Shared checks for end-to-end runner tests: what a finished run directory must satisfy."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
from PIL import Image

from batchflux.store import iter_jsonl

SCHEMAS = Path(__file__).resolve().parent.parent / "batchflux" / "schemas"
RESULT_SCHEMA = json.loads((SCHEMAS / "result.schema.json").read_text())
API_KEY = "afk_e2e_secret_key_5f3a9c"


def write_manifest(directory: Path, *, prompts: int = 3, seeds: int = 2,
                   aspects: tuple[str, ...] = ("1:1", "16:9"), extra: str = "") -> Path:
    """A small YAML manifest: prompts x seeds x aspect ratios items."""
    lines = ["prompts:"]
    lines += [f"  - id: p{i}\n    text: \"test product number {i}, studio photo\""
              for i in range(prompts)]
    lines += ["grid:", f"  seeds: {{count: {seeds}, start: 1}}",
              f"  aspect_ratio: [{', '.join(repr(a) for a in aspects)}]"]
    path = directory / "manifest.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every line of results.jsonl, each validated against result.schema.json."""
    path = out / "results.jsonl"
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "results.jsonl ends in a torn line"
    records = [record for _, record in iter_jsonl(path)]
    assert len(records) == raw.count(b"\n"), "results.jsonl has unparsable lines"
    validator = jsonschema.Draft202012Validator(RESULT_SCHEMA,
                                               format_checker=jsonschema.FormatChecker())
    for record in records:
        errors = sorted(validator.iter_errors(record), key=str)
        assert not errors, f"result line invalid: {errors[0].message} in {record}"
    return records


def check_run_directory(out: Path, *, expected_items: int) -> list[dict[str, Any]]:
    """The invariants of DESIGN.md section 4, checked from the disk alone."""
    records = load_results(out)
    keys = Counter(r["key"] for r in records)
    final = {}
    for record in records:  # the last line for a key wins (a retried failure)
        final[record["key"]] = record
    assert len(final) == expected_items, (len(final), expected_items)
    listed = set()
    for record in final.values():
        if record["status"] == "ok":
            assert record["files"], record
            for f in record["files"]:
                path = out / f["path"]
                assert path.is_file() and not path.is_symlink(), f["path"]
                assert path.resolve().is_relative_to((out / "images").resolve())
                data = path.read_bytes()
                assert hashlib.sha256(data).hexdigest() == f["sha256"], f["path"]
                assert len(data) == f["bytes"]
                with Image.open(path) as im:
                    im.load()
                    assert im.size == (f["width"], f["height"])
                listed.add(path.resolve())
        else:
            assert record["error"]["category"], record
    on_disk = {p.resolve() for p in (out / "images").rglob("*") if p.is_file()}
    assert on_disk >= listed
    leftovers = list((out / ".batchflux" / "tmp").glob("*"))
    assert leftovers == [], f"partial files left: {leftovers}"
    assert all(n >= 1 for n in keys.values())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["counts"]) >= {"ok", "failed", "skipped"}
    return list(final.values())


def start_run(manifest: Path, out: Path, base_url: str, *extra: str,
              workers: int = 8) -> subprocess.Popen[str]:
    """``batchflux run`` in a child process against a loopback simulator (it can be killed)."""
    env = {**os.environ, "APIFRAME_API_KEY": API_KEY}
    env.pop("APIFRAME_BASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "batchflux", "run", str(manifest), "--base-url", base_url,
         "--out", str(out), "-j", str(workers), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def line_count(path: Path) -> int:
    """Newlines in a file that may not exist yet."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0
