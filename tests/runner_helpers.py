"""Shared checks for end-to-end runner tests: what a finished run directory must satisfy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from PIL import Image

from batchflux.config import Api, Simulator
from batchflux.models import RunOptions
from batchflux.store import iter_jsonl

SCHEMAS = Path(__file__).resolve().parent.parent / "batchflux" / "schemas"
RESULT_SCHEMA = json.loads((SCHEMAS / "result.schema.json").read_text())
API_KEY = "afk_e2e_secret_key_5f3a9c"


def inprocess(app: Any, *, api_key: str = API_KEY, **kw: Any) -> Api:
    """The target of a simulator app run in-process (``httpx.ASGITransport``)."""
    return Api(api_key=api_key, base_url="http://sim.local",
               transport=httpx.ASGITransport(app=app), **kw)


def loopback(base_url: str, *, api_key: str = API_KEY, **kw: Any) -> Api:
    """The target of a simulator served over real HTTP (``serve_in_thread``)."""
    return Api(api_key=api_key, base_url=base_url, **kw)


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


# Runs in a child process so that the offline switches are in place before ``datasets`` is
# imported (it reads them at import time) and nothing can reach the Hub.
LOAD_HF = """
import json, sys
from datasets import load_dataset
ds = load_dataset("imagefolder", data_dir=sys.argv[1], cache_dir=sys.argv[2], split="train")
rows = []
for row in ds:
    image = row["image"]
    rows.append({"text": row["text"], "seed": row["seed"], "key": row["key"],
                 "params": row["params"], "size": list(image.size),
                 "width": row["width"], "height": row["height"],
                 "decision": row.get("decision")})
print(json.dumps({"columns": ds.column_names, "rows": rows}))
"""


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    return env


def load_imagefolder(data_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """``datasets.load_dataset("imagefolder", data_dir=...)`` in an offline child process:
    ``{"columns": [...], "rows": [{"text", "seed", "key", "params", "size", ...}]}``."""
    proc = subprocess.run([sys.executable, "-c", LOAD_HF, str(data_dir),
                           str(tmp_path / "hf-load-cache")], env=offline_env(tmp_path),
                          check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


REVIEW_MANIFEST = """\
prompts:
  - id: mug
    text: a red ceramic mug on an oak table, studio photo
  - id: vase
    text: a blue glass vase on linen, studio photo
defaults:
  output_quality: 90
grid:
  seeds: [1, 2, 3]
  aspect_ratio: ["1:1", "16:9"]
"""


def run_batch_in_thread(manifest: Path, options: RunOptions | None = None,
                        **kwargs: Any) -> Any:
    """``batch.run_batch(manifest, options, **kwargs)`` in a thread of its own: a browser
    fixture (playwright's sync API) keeps an event loop marked as running in the test's thread
    while it is open."""
    from concurrent.futures import ThreadPoolExecutor

    from batchflux import batch

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(batch.run_batch, manifest, options, **kwargs).result()


async def run_until_first_result(manifest: Path, options: RunOptions, app: Any) -> Any:
    """Run ``manifest`` on the in-process simulator ``app`` and stop it, as Ctrl-C would, as
    soon as the first result is recorded (jobs still in flight stay on the journal)."""
    import anyio

    from batchflux import batch
    from batchflux.models import Result
    from batchflux.runner import NullReporter

    stop = anyio.Event()

    class StopAfterFirst(NullReporter):
        def result(self, record: Result) -> None:
            stop.set()

    return await batch.run_batch_async(manifest, options, target=inprocess(app),
                                       reporter=StopAfterFirst(), stop=stop)


def review_run(base: Path) -> Path:
    """A finished simulator run to review: 2 prompts x 3 seeds x 2 aspect ratios, a few items
    FAILED by content policy (not retried), the rest ok with real PNG files."""
    from batchflux.sim import SimSettings

    manifest = base / "manifest.yaml"
    manifest.write_text(REVIEW_MANIFEST)
    out = base / "run"
    settings = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="full",
                           fail_rate=0.3, fail_capacity_share=0.0, fault_seed=5)
    result = run_batch_in_thread(manifest, RunOptions(out_dir=out),
                                 target=Simulator(settings=settings, job_seconds=0.2))
    counts = result.summary["counts"]
    assert counts["ok"] + counts["failed"] == 12
    assert 0 < counts["failed"] < 12, counts  # fault_seed 5 gives both
    return out


def sim_jobs_created(out: Path) -> int:
    """The jobs the built-in simulator created (each one paid) for run directory ``out``
    across all its runs: the job records of its journal, ``OUT/.batchflux/sim``."""
    journal = out / ".batchflux" / "sim" / "journal.jsonl"
    return sum(1 for _, line in iter_jsonl(journal) if line.get("type") == "job")


def reroll_rejected(manifest: Path, out: Path) -> Any:
    """``batchflux run manifest --reroll rejected`` on the built-in simulator (no faults, full
    pictures, short jobs), in a thread of its own (:func:`run_batch_in_thread`). Nothing it
    runs fails (the exit code also counts the directory's earlier failures)."""
    from batchflux.sim import SimSettings

    settings = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="full")
    result = run_batch_in_thread(manifest, RunOptions(out_dir=out, reroll="rejected"),
                                 target=Simulator(settings=settings, job_seconds=0.2))
    assert result.summary["counts"]["failed"] == 0, result.summary
    return result


@dataclass(frozen=True)
class Rerolled:
    """A :func:`review_run` directory after two review rounds and two rerolls: ``first`` and
    ``second`` (ok items of different prompts) rejected; ``--reroll rejected`` made attempt 1
    of each; attempt 1 of ``first`` rejected in turn; the second ``--reroll rejected`` made
    attempt 2 of ``first`` and nothing else. ``rerolls`` maps each original to its rerolls'
    keys, by attempt."""

    out: Path
    first: str
    second: str
    rerolls: dict[str, list[str]]


def rerolled_run(finished: Path, base: Path) -> Rerolled:
    """A copy of the :func:`review_run` directory ``finished`` in ``base``, rerolled as
    :class:`Rerolled` says; each reroll paid exactly once (the simulator's jobs)."""
    from batchflux.reviewapp import append_decision

    out = base / "run"
    shutil.copytree(finished, out)
    manifest = finished.parent / "manifest.yaml"
    ok = [r for r in load_results(out) if r["status"] == "ok"]
    first = next(r["key"] for r in ok if r["prompt_id"] == "mug")
    second = next(r["key"] for r in reversed(ok) if r["prompt_id"] == "vase")
    jobs = sim_jobs_created(out)
    append_decision(out, first, "reject")
    append_decision(out, second, "reject")
    reroll_rejected(manifest, out)
    assert sim_jobs_created(out) == jobs + 2
    by_original: dict[str, list[str]] = {first: [], second: []}
    for record in load_results(out):
        if record.get("reroll_of"):
            by_original[record["reroll_of"]].append(record["key"])
    assert all(len(keys) == 1 for keys in by_original.values()), by_original
    append_decision(out, by_original[first][0], "reject")
    reroll_rejected(manifest, out)
    assert sim_jobs_created(out) == jobs + 3
    attempts = {r["key"]: (r["reroll_of"], r["attempt"])
                for r in load_results(out) if r.get("reroll_of")}
    rerolls = {original: sorted((k for k, (o, _) in attempts.items() if o == original),
                                key=lambda k: attempts[k][1])
               for original in (first, second)}
    assert [attempts[k][1] for k in rerolls[first]] == [1, 2]
    assert [attempts[k][1] for k in rerolls[second]] == [1]
    return Rerolled(out, first, second, rerolls)
