"""``batchflux verify OUT [--fix]``: re-check every image a run directory says it holds.

For the final ``ok`` result of each item (the ok line if any, a later ok line over an earlier
one: the rule of :mod:`batchflux.results`), every file it lists is checked from the disk:

- it exists, inside ``OUT/images/`` (a line pointing elsewhere is refused, never read);
- its size is the recorded ``bytes``;
- its sha256 is the recorded ``sha256``;
- it decodes whole (Pillow, every pixel).

A line that is not a result record (say, a files entry without its sha256 or size) cannot
say what the disk should hold: it is skipped and reported as a bad line, with its line
number and reason (``VerifyReport.bad_lines``).

Each problem names the file, what is wrong, and the item (prompt id, aspect ratio, template
variables, seed, key). With ``fix=True`` every file that fails is moved into
``OUT/.batchflux/quarantine/`` under its own relative path (never deleted), so the next
``batchflux run`` on the directory sees the item's file missing and fetches it again. A file
that two result lines share is moved only when it matches neither. ``--fix`` holds the
directory lock while it moves files, so it never races a run.

    >>> import shutil
    >>> from pathlib import Path
    >>> _ = shutil.copytree("out/nightly", "out/damaged")
    >>> first = next(Path("out/damaged/images/lighthouse").iterdir())
    >>> _ = first.write_bytes(first.read_bytes() + b"?")
    >>> report = verify_run("out/damaged")
    >>> report.ok, report.files, [str(p) for p in report.problems]
    (False, 12, ['images/lighthouse/...: ...'])
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from .display import escape_controls, item_label, plural
from .errors import ImageCheckError, UsageError
from .fileutil import sha256_file
from .imagecheck import inspect_image
from .models import Result
from .results import read_results, recorded_path
from .store import LOCK_NAME, RESULTS_NAME, STATE_DIR, BadLine, DirectoryLock, OnBadLine

__all__ = ["QUARANTINE_DIR", "FileProblem", "VerifyReport", "verify_run"]

#: Where ``--fix`` moves bad files, relative to the run directory.
QUARANTINE_DIR = f"{STATE_DIR}/quarantine"

ProblemKind = Literal["missing", "size", "sha256", "decode", "outside"]

#: How each kind of problem reads in a report.
PROBLEM_TEXT: Mapping[str, str] = {
    "missing": "missing",
    "size": "size differs",
    "sha256": "sha256 differs",
    "decode": "does not decode",
    "outside": "path outside images/",
}


@dataclass(frozen=True, slots=True)
class FileProblem:
    """One file of an ok result that is not what its result line recorded."""

    key: str  # the item key
    label: str  # how messages name the item (see display.item_label)
    path: str  # the file's path as recorded, relative to the run directory
    kind: ProblemKind
    detail: str = ""
    quarantined: str | None = None  # where ``fix`` moved it, relative to the run directory

    def __str__(self) -> str:
        text = escape_controls(self.path) + ": " + PROBLEM_TEXT[self.kind]
        if self.detail:
            text += f" ({self.detail})"
        text += f"; item {self.label}"
        if self.quarantined:
            text += f"; moved to {self.quarantined}"
        return text


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify_run` found.

    >>> from batchflux import verify_run
    >>> report = verify_run("out/nightly")
    >>> report.ok, report.problems, report.fixed
    (True, (), False)
    """

    out_dir: Path
    items: int  # ok items checked
    files: int  # files checked (a file two items share counts once)
    problems: tuple[FileProblem, ...]
    bad_lines: tuple[BadLine, ...]  # results.jsonl lines that could not be read (skipped)
    fixed: bool = False  # run with fix=True

    @property
    def ok(self) -> bool:
        """True when every file matches its result line."""
        return not self.problems

    @property
    def counts(self) -> dict[str, int]:
        """Problems by kind (``missing``, ``size``, ``sha256``, ``decode``, ``outside``)."""
        return dict(Counter(p.kind for p in self.problems))

    @property
    def quarantined(self) -> tuple[str, ...]:
        """The files ``fix`` moved aside, relative to the run directory."""
        return tuple(dict.fromkeys(p.quarantined for p in self.problems if p.quarantined))

    def summary_line(self) -> str:
        """One line: what was checked and what was found."""
        head = f"{plural(self.items, 'item')}, {plural(self.files, 'file')} checked"
        if self.ok:
            return f"{head}: every file matches its result line"
        by_kind = ", ".join(f"{n} {PROBLEM_TEXT[k]}" for k, n in sorted(self.counts.items()))
        line = f"{head}: {plural(len(self.problems), 'problem')} ({by_kind})"
        if self.fixed:
            moved = len(self.quarantined)
            line += (f"; {plural(moved, 'file')} moved to "
                     f"{self.out_dir / QUARANTINE_DIR}; `batchflux run` on {self.out_dir} "
                     "fetches every missing file again")
        else:
            line += f"; `batchflux verify {self.out_dir} --fix` moves the bad files aside"
        return line


@dataclass(frozen=True, slots=True)
class _Claim:
    """One ok item's record of one file: what the disk must hold at its path."""

    key: str
    label: str
    bytes: int
    sha256: str


class _Facts:
    """What the disk holds at one path, each fact computed once and only when needed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self._sha256: str | None = None
        self._decoded = False
        self._decode_error: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    @property
    def decode_error(self) -> str | None:
        if not self._decoded:
            try:
                inspect_image(self.path)
            except ImageCheckError as exc:
                self._decode_error = str(exc)
            self._decoded = True
        return self._decode_error


def _check(claim: _Claim, facts: _Facts) -> tuple[ProblemKind, str] | None:
    if facts.size != claim.bytes:
        return "size", f"recorded {claim.bytes} bytes, found {facts.size}"
    if facts.sha256 != claim.sha256:
        return "sha256", f"recorded {claim.sha256[:12]}, found {facts.sha256[:12]}"
    if facts.decode_error is not None:
        return "decode", facts.decode_error
    return None


def _claims(records: Iterable[Result]) -> dict[str, list[_Claim]]:
    """Recorded path -> every ok item's claim on it, in manifest order."""
    claims: dict[str, list[_Claim]] = {}
    for record in records:
        if not record.ok:
            continue
        label = item_label(record)
        for f in record.files:
            claims.setdefault(f.path, []).append(
                _Claim(key=record.key, label=label, bytes=f.bytes, sha256=f.sha256))
    return claims


def _quarantine(out: Path, rel: str) -> str:
    """Move ``out/rel`` to the quarantine under the same relative path (a free name)."""
    target = out / QUARANTINE_DIR / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while target.exists() or target.is_symlink():
        n += 1
        target = out / QUARANTINE_DIR / f"{rel}.{n}"
    os.replace(out / rel, target)
    return target.relative_to(out).as_posix()


def verify_run(out_dir: str | os.PathLike[str], *, fix: bool = False,
               on_problem: Callable[[FileProblem], None] | None = None,
               on_bad_line: OnBadLine | None = None) -> VerifyReport:
    """Check every file of every final ok result in ``out_dir`` (see the module doc).

    ``on_problem`` is called with each problem as it is found (after the move, with
    ``fix``); ``on_bad_line`` with each results line that could not be read. Raises
    :class:`~batchflux.errors.UsageError` when ``out_dir`` is not a run directory, and
    :class:`~batchflux.errors.OutputLockedError` when ``fix`` meets a run in progress.

    >>> from batchflux import verify_run
    >>> report = verify_run("out/nightly")
    >>> report.ok, report.items, report.files
    (True, 12, 12)
    """
    out = Path(out_dir)
    if not (out / RESULTS_NAME).is_file():
        raise UsageError(f"{out} is not a batchflux run directory (no {RESULTS_NAME})")
    lock: DirectoryLock | None = None
    if fix:
        (out / STATE_DIR).mkdir(exist_ok=True)
        lock = DirectoryLock(out / STATE_DIR / LOCK_NAME)
        lock.acquire()
    try:
        results = read_results(out, on_bad_line=on_bad_line)
        records = results.ordered()
        problems: list[FileProblem] = []
        claims = _claims(records)
        for rel, claimants in claims.items():
            found, movable = _verify_path(out, rel, claimants)
            if fix and movable:
                moved = _quarantine(out, rel)
                found = [replace(p, quarantined=moved) for p in found]
            for problem in found:
                if on_problem is not None:
                    on_problem(problem)
            problems.extend(found)
    finally:
        if lock is not None:
            lock.release()
    order = {record.key: n for n, record in enumerate(records)}
    problems.sort(key=lambda p: (order.get(p.key, 0), p.path))
    return VerifyReport(out_dir=out, items=sum(record.ok for record in records),
                        files=len(claims), problems=tuple(problems),
                        bad_lines=results.bad_lines, fixed=fix)


def _verify_path(out: Path, rel: str, claimants: list[_Claim]
                 ) -> tuple[list[FileProblem], bool]:
    """The problems of each claim on one recorded path (empty when all match), and whether
    the file is there and matches none of them (so ``fix`` may move it)."""
    path = recorded_path(out, rel)
    if path is None:
        return [FileProblem(c.key, c.label, rel, "outside", "not followed")
                for c in claimants], False
    try:
        facts = _Facts(path) if path.is_file() else None
    except OSError:
        facts = None
    if facts is None:
        return [FileProblem(c.key, c.label, rel, "missing") for c in claimants], False
    problems = []
    for claim in claimants:
        try:
            found = _check(claim, facts)
        except OSError as exc:  # vanished or unreadable while we looked
            return [FileProblem(c.key, c.label, rel, "missing", exc.strerror or str(exc))
                    for c in claimants], False
        if found is not None:
            kind, detail = found
            problems.append(FileProblem(claim.key, claim.label, rel, kind, detail))
    return problems, len(problems) == len(claimants)
