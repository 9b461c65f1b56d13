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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .models import RecordError, Result
from .store import RESULTS_NAME, BadLine, OnBadLine, iter_jsonl_numbered

__all__ = ["RunResults", "choose", "iter_records", "read_results", "recorded_path", "run_records",
           "sort_key"]

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
