"""``batchflux merge OUT1 OUT2 ... --into OUT``: combine run directories (shards) into one.

Each source is a run directory (``results.jsonl``, ``images/``, ``summary.json``, and the
frozen manifest in ``.batchflux/``). The merge:

- refuses sources made from different manifests (compared by content) unless ``force``;
- keeps one result per item key: an ``ok`` line beats a failed one, a later line an earlier
  one (the same rule a resumed run follows);
- copies every image of the kept results (a hard link when source and target share a
  filesystem), then checks the sha256 of every file in the target against its result line;
- writes the merged ``results.jsonl`` and ``summary.json`` atomically
  (:func:`batchflux.fileutil.write_atomic`), so a crash mid-merge leaves the previous target
  intact, and merging again is safe. The summary's counts, credits, images and latencies are a
  :class:`~batchflux.summary.Tally` of the merged lines, as a run counts its own.

The target may already hold a run (an earlier merge, or one of the shards): its results take
part in the merge like any source.

Results of items the manifest no longer has (a prompt edited after a shard ran) are merged
too: a merge combines what the shards hold and drops nothing it could not get back. They are
counted (``MergeReport.not_in_manifest``, a warning on the command line), and the target
records the items of the manifest as the union of the sources' records
(``.batchflux/item-keys.bin``), so that ``report``, ``export`` and ``review`` on the merged
directory leave them out unless ``--all``, as on each shard. When one of the directories has
no such record (an older batchflux made it), neither has the target: every item counts.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import shutil
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .display import item_label
from .errors import IntegrityError, MergeError, UsageError
from .fileutil import copy_atomic, replace_atomic, sha256_file, write_atomic, write_json_atomic
from .models import Result
from .results import choose, in_manifest, iter_records, read_results, recorded_path, sort_key
from .stats import utc_now
from .store import (
    LOCK_NAME,
    RESULTS_NAME,
    STATE_DIR,
    SUMMARY_NAME,
    BadLine,
    DirectoryLock,
    OnBadLine,
    forget_item_keys,
    read_item_keys,
    save_item_keys,
)
from .summary import Tally

__all__ = ["MergeError", "MergeReport", "final_records", "manifest_digest", "merge_runs",
           "merged_item_keys"]


@dataclass(frozen=True, slots=True)
class MergeReport:
    """What a merge did."""

    into: Path
    sources: tuple[Path, ...]
    items: int
    ok: int
    failed: int
    files_linked: int
    files_copied: int
    files_present: int
    duplicates: int
    bad_lines: tuple[BadLine, ...] = ()  # lines of the sources' results.jsonl skipped
    #: Merged items that are not in the manifest (kept; report, export and review hide them
    #: unless --all).
    not_in_manifest: int = 0


def final_records(out_dir: Path) -> dict[str, Result]:
    """The result that counts for each key of one run directory: the ok line if any, else
    the last line. Unreadable lines are skipped (see :func:`batchflux.results.read_results`,
    which also reports them)."""
    return dict(read_results(out_dir).records)


def manifest_digest(out_dir: Path) -> str | None:
    """sha256 of the manifest a run directory was made from (its frozen copy, else the
    digest recorded in summary.json), or None when neither exists."""
    state = out_dir / STATE_DIR
    frozen = sorted(state.glob("manifest.*")) if state.is_dir() else []
    for path in frozen:
        if path.is_file() and not path.name.endswith(".tmp"):
            return sha256_file(path)
    summary = _read_summary(out_dir)
    digest = summary.get("manifest_sha256")
    return digest if isinstance(digest, str) else None


def merged_item_keys(dirs: Iterable[Path]) -> array | None:  # type: ignore[type-arg]
    """The items of the manifest of a merge of ``dirs``: the union of each directory's record
    (sorted, distinct), or None when one of them has none (every item then counts). Raises
    :class:`~batchflux.errors.RunDirectoryError` for a damaged record."""
    records = []
    for directory in dirs:
        keys = read_item_keys(directory)
        if keys is None:
            return None
        records.append(keys)
    union = array("Q")
    for kid in heapq.merge(*records):  # each is sorted: 8 bytes an item, no set
        if not union or union[-1] != kid:
            union.append(kid)
    return union


def _read_summary(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing paths that leave ``root/images`` (a result line is data, not
    trust)."""
    path = recorded_path(root, rel)
    if path is None:
        raise MergeError(f"refusing file path {rel!r}: outside the run's images/")
    return path


def merge_runs(sources: Iterable[str | os.PathLike[str]], into: str | os.PathLike[str], *,
               force: bool = False, on_bad_line: OnBadLine | None = None) -> MergeReport:
    """Merge run directories ``sources`` into ``into`` (created if missing). See the module
    docstring. Raises :class:`MergeError`, :class:`~batchflux.errors.IntegrityError` or
    :class:`~batchflux.errors.UsageError`. Each unreadable results line is in the report's
    ``bad_lines`` and is also passed to ``on_bad_line`` as it is met.

    >>> from batchflux import RunOptions, Shard, Simulator, merge_runs, run_batch
    >>> for index in range(2):
    ...     _ = run_batch("jobs/nightly.yaml", RunOptions(out_dir=f"out/part-{index}",
    ...                   shard=f"{index}/2"), target=Simulator(job_seconds=0.1))
    >>> report = merge_runs(["out/part-0", "out/part-1"], "out/merged")
    >>> report.items, report.ok, report.failed
    (12, 12, 0)
    """
    target = Path(into)
    paths = [Path(s) for s in sources]
    if not paths:
        raise UsageError("merge needs at least one source run directory")
    for path in paths:
        if not (path / RESULTS_NAME).is_file():
            raise UsageError(f"{path} is not a batchflux run directory (no {RESULTS_NAME})")
        if path.resolve() == target.resolve():
            raise UsageError(f"{path} is also the target; the target's own results are "
                             "merged automatically")
    target_has_run = (target / RESULTS_NAME).is_file()
    all_dirs = ([target] if target_has_run else []) + paths
    digests = {path: manifest_digest(path) for path in all_dirs}
    if len({d for d in digests.values()}) > 1 and not force:
        listing = "; ".join(f"{p}: {(d or 'unknown')[:12]}" for p, d in digests.items())
        raise MergeError("the run directories were made from different manifests "
                         f"({listing}); pass --force to merge them anyway")
    keys = merged_item_keys(all_dirs)  # a damaged record stops the merge before any change

    (target / STATE_DIR).mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(target / STATE_DIR / LOCK_NAME)
    lock.acquire()
    try:
        return _merge_locked(all_dirs, paths, target, digests, keys, on_bad_line)
    finally:
        lock.release()


def _merge_locked(all_dirs: list[Path], sources: list[Path], target: Path,
                  digests: Mapping[Path, str | None], keys: array | None,  # type: ignore[type-arg]
                  on_bad_line: OnBadLine | None) -> MergeReport:
    bad: list[BadLine] = []

    def skipped(line: BadLine) -> None:
        bad.append(line)
        if on_bad_line is not None:
            on_bad_line(line)

    chosen: dict[str, Result] = {}
    origin: dict[str, Path] = {}
    duplicates = 0
    for directory in all_dirs:
        for record in iter_records(directory, skipped):
            if record.key in chosen:
                duplicates += 1
            if choose(chosen, record):
                origin[record.key] = directory

    linked = copied = present = 0
    claimed: dict[str, str] = {}  # target path -> sha256, to catch two items on one name
    for key, record in chosen.items():
        if not record.ok:
            continue
        source_dir = origin[key]
        for f in record.files:
            rel, sha = f.path, f.sha256
            if claimed.setdefault(rel, sha) != sha:
                raise MergeError(f"two different images claim {rel}; merge them into "
                                 "separate directories or use distinct file-name templates")
            src = _inside(source_dir, rel)
            dst = _inside(target, rel)
            how = _place(src, dst, sha, record, source_dir)
            linked += how == "linked"
            copied += how == "copied"
            present += how == "present"

    ordered = sorted(chosen.values(), key=sort_key)
    write_atomic(target / RESULTS_NAME, _jsonl(ordered))
    if keys is None:
        forget_item_keys(target)
    else:
        save_item_keys(target, keys)
    for directory in sources:  # keep a manifest beside the merged results, for later merges
        frozen = sorted((directory / STATE_DIR).glob("manifest.*"))
        if frozen and not any((target / STATE_DIR).glob("manifest.*")):
            copy_atomic(frozen[0], target / STATE_DIR / frozen[0].name)
    summary = _merged_summary(ordered, all_dirs, digests)
    write_json_atomic(target / SUMMARY_NAME, summary)
    counts = summary["counts"]
    return MergeReport(into=target, sources=tuple(sources), items=len(ordered),
                       ok=counts["ok"], failed=counts["failed"], files_linked=linked,
                       files_copied=copied, files_present=present, duplicates=duplicates,
                       bad_lines=tuple(bad),
                       not_in_manifest=sum(not in_manifest(r, keys) for r in ordered))


def _place(src: Path, dst: Path, sha: str, record: Result, source_dir: Path) -> str:
    """Put ``src`` at ``dst`` and prove it by sha256. Returns linked, copied or present."""
    if dst.is_file() and not dst.is_symlink() and sha256_file(dst) == sha:
        return "present"
    if not src.is_file():
        raise IntegrityError(
            f"item {item_label(record)}: {src} is listed in its results.jsonl but missing; "
            f"`batchflux run` on {source_dir} fetches it again "
            "(`batchflux verify` lists every such file)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.merge")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
        how = "linked"
    except OSError:
        shutil.copyfile(src, tmp)
        how = "copied"
    actual = sha256_file(tmp)
    if actual != sha:
        tmp.unlink()
        raise IntegrityError(
            f"item {item_label(record)}: {src} does not match the sha256 in its results.jsonl "
            f"(found {actual[:12]}, recorded {sha[:12]}); `batchflux verify "
            f"{source_dir} --fix` moves it aside so that `batchflux run` fetches it "
            "again")
    replace_atomic(tmp, dst)
    return how


def _jsonl(records: Iterable[Result]) -> Iterator[bytes]:
    """Each record as its results.jsonl line (the runner's own shape: compact, key first)."""
    for record in records:
        yield (json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=False)
               + "\n").encode("utf-8")


def _merged_summary(records: list[Result], dirs: list[Path],
                    digests: Mapping[Path, str | None]) -> dict[str, Any]:
    tally = Tally()
    for record in records:
        tally.add(record)
    shards = []
    for directory in dirs:
        summary = _read_summary(directory)
        shards.append({"path": str(directory), "shard": summary.get("shard"),
                       "manifest_sha256": digests.get(directory)})
    known = {d for d in digests.values() if d}
    counted = tally.to_json()
    return {
        "merged_at": utc_now(),
        "total_items": len(records),
        **counted,
        "counts": {**counted["counts"], "skipped": 0},
        "manifest_sha256": known.pop() if len(known) == 1 else None,
        "shard": None,
        "merged_from": shards,
    }
