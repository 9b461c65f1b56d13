"""Reading what a run directory holds: the one reader of ``results.jsonl`` that the post-run
tools (``report``, ``merge``, ``export``, ``verify``) share.

Every good line is a :class:`~batchflux.models.Result`. A line that cannot be read (blank,
garbage, an unfinished last line) or that is not a result record (``Result.from_json`` refuses
it: no item key, an unknown status or error category, a files entry without its size...) is
skipped and reported as a :class:`~batchflux.store.BadLine` naming the file, the line and the
reason; every good line counts, whatever comes before or after it.

For each item key one line counts: an ``ok`` line beats a failed one, and a later line an
earlier one of the same kind (the rule a resumed run follows: an ok item is never redone, a
failure retried later is replaced by its newer outcome).

A run directory can hold results of items its manifest no longer has (a prompt edited, an axis
shortened): :func:`split_by_manifest` tells the items of the current manifest (recorded by
the latest run in ``.batchflux/item-keys.bin``) from the others, which reports, exports and
the review app leave out unless asked for all.

    >>> import shutil
    >>> _ = shutil.copytree("out/nightly", "out/torn")
    >>> with open("out/torn/results.jsonl", "a") as results_file:
    ...     _ = results_file.write("{not json\\n")
    >>> results = read_results("out/torn")
    >>> len(results.records), [str(b) for b in results.bad_lines]
    (12, ['out/torn/results.jsonl:13: ...'])
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .models import RecordError, Result
from .store import RESULTS_NAME, BadLine, OnBadLine, in_keys, iter_jsonl_numbered, read_item_keys

__all__ = ["ManifestSplit", "RunResults", "choose", "in_manifest", "iter_records",
           "read_results", "recorded_path", "run_records", "sort_key", "split_by_manifest"]

IMAGES_DIR = "images"


@dataclass(frozen=True, slots=True)
class RunResults:
    """The result that counts for each item of one run directory, and the lines skipped."""

    out_dir: Path
    records: Mapping[str, Result]  # item key -> its final result line
    lines: int  # good lines read (an item retried has several)
    bad_lines: tuple[BadLine, ...]

    def ordered(self) -> list[Result]:
        """The final records in manifest order (item index, then key)."""
        return sorted(self.records.values(), key=sort_key)


def sort_key(record: Result) -> tuple[int, str]:
    """Manifest order for result lines: item index, then key."""
    return (record.index, record.key)


def iter_records(out_dir: str | os.PathLike[str], on_bad_line: OnBadLine) -> Iterator[Result]:
    """Every good line of ``OUT/results.jsonl`` in file order, as a :class:`Result`; a line
    that is not a result record is reported to ``on_bad_line`` like an unreadable one."""
    path = Path(out_dir) / RESULTS_NAME
    for number, data in iter_jsonl_numbered(path, on_bad_line=on_bad_line):
        try:
            yield Result.from_json(data)
        except RecordError as exc:
            on_bad_line(BadLine(str(path), number, f"not a result line: {exc}"))


def choose(chosen: dict[str, Result], record: Result) -> bool:
    """Keep ``record`` in ``chosen`` if it beats what is there for its key (an ok line beats
    a failed one, else the later line wins). True when kept."""
    current = chosen.get(record.key)
    if current is not None and current.ok and not record.ok:
        return False
    chosen[record.key] = record
    return True


def read_results(out_dir: str | os.PathLike[str], *,
                 on_bad_line: OnBadLine | None = None) -> RunResults:
    """The final result of every item in ``out_dir`` (see the module doc). Every skipped line
    is in ``bad_lines``, and also passed to ``on_bad_line`` when given, as it is met.

    >>> from batchflux import read_results
    >>> results = read_results("out/nightly")
    >>> len(results.records), results.bad_lines, results.ordered()[0].prompt_id
    (12, (), 'lighthouse')
    """
    out = Path(out_dir)
    bad: list[BadLine] = []

    def skipped(line: BadLine) -> None:
        bad.append(line)
        if on_bad_line is not None:
            on_bad_line(line)

    chosen: dict[str, Result] = {}
    lines = 0
    for record in iter_records(out, skipped):
        lines += 1
        choose(chosen, record)
    return RunResults(out_dir=out, records=chosen, lines=lines, bad_lines=tuple(bad))


def run_records(out_dir: str | os.PathLike[str]) -> list[Result]:
    """The result that counts for each item of run ``out_dir``, in manifest order
    (:class:`~batchflux.errors.UsageError` when ``out_dir`` is not a run directory). Lines
    that cannot be read are skipped (:func:`read_results` lists them)."""
    out = Path(out_dir)
    if not (out / RESULTS_NAME).is_file():
        raise UsageError(f"{out} is not a batchflux run directory (no {RESULTS_NAME})")
    return read_results(out).ordered()


def in_manifest(record: Result, keys: array | None) -> bool:  # type: ignore[type-arg]
    """True when ``record`` is an item of the manifest whose item ``keys`` a run recorded
    (:func:`~batchflux.store.read_item_keys`): its key is one of them, or it is a reroll of
    one (``reroll_of``: a new image of a current item belongs to the manifest, whether or not
    the latest run had ``--reroll``). With no keys (a directory of an older batchflux), every
    record is."""
    if keys is None:
        return True
    return in_keys(keys, record.key) or (record.reroll_of is not None
                                         and in_keys(keys, record.reroll_of))


@dataclass(frozen=True, slots=True)
class ManifestSplit:
    """A run directory's final records split by its current manifest (:func:`split_by_manifest`).

    ``current`` and ``others`` are in manifest order; ``known`` is False for a directory
    without a record of its manifest's items (an older batchflux wrote it): then every record
    is current and ``others`` is empty.
    """

    results: RunResults
    current: tuple[Result, ...]
    others: tuple[Result, ...]
    known: bool

    @property
    def not_in_manifest(self) -> int:
        """How many items have a result but are not in the manifest."""
        return len(self.others)

    def records(self, *, include_all: bool = False) -> list[Result]:
        """The records a post-run tool shows: the current ones, or with ``include_all`` every
        record (in manifest order, the others among them by their old index)."""
        return self.results.ordered() if include_all else list(self.current)

    def stale_keys(self) -> frozenset[str]:
        """The keys of the records that are not in the manifest."""
        return frozenset(record.key for record in self.others)


def split_by_manifest(out_dir: str | os.PathLike[str], *,
                      on_bad_line: OnBadLine | None = None) -> ManifestSplit:
    """The final record of every item of ``out_dir`` (:func:`read_results`), split into the
    items of the manifest the latest run ran and the others (see :func:`in_manifest`).

    Raises :class:`~batchflux.errors.UsageError` when ``out_dir`` is not a run directory and
    :class:`~batchflux.errors.RunDirectoryError` (exit 65) when its record of the manifest's
    items is damaged.
    """
    out = Path(out_dir)
    if not (out / RESULTS_NAME).is_file():
        raise UsageError(f"{out} is not a batchflux run directory (no {RESULTS_NAME})")
    keys = read_item_keys(out)
    results = read_results(out, on_bad_line=on_bad_line)
    current: list[Result] = []
    others: list[Result] = []
    for record in results.ordered():
        (current if in_manifest(record, keys) else others).append(record)
    return ManifestSplit(results=results, current=tuple(current), others=tuple(others),
                         known=keys is not None)


def recorded_path(out_dir: Path, rel: str) -> Path | None:
    """``out_dir / rel`` for a file path taken from a result line, or None when it would lead
    outside ``OUT/images/`` (``..``, an absolute path, a symlinked directory): a result line
    is data, not trust."""
    if not rel.startswith(f"{IMAGES_DIR}/"):
        return None
    target = (out_dir / rel).resolve()
    if not target.is_relative_to((out_dir / IMAGES_DIR).resolve()):
        return None
    return out_dir / rel
