"""The run directory: journal, results, atomic image writes, the resume index and the lock.

::

    OUT/
      images/<name from the file-name template>.<ext>
      results.jsonl         one line per finished item (schemas/result.schema.json)
      summary.json          written at the end of every run
      .batchflux/
        journal.jsonl       submit intents and jobIds, appended before waiting on a job
        lock                flock()ed by the run that holds the directory (its pid inside,
                            for messages only)
        manifest.*          frozen copy of the manifest of the latest run
        item-keys.bin       the key ids of that manifest's items (8 bytes each, sorted):
                            what reports and exports call "in the manifest"
        tmp/                partial downloads (never a final name until verified)

Invariants: a line in ``results.jsonl`` means its files exist whole and verified; a jobId is in
the journal before anyone waits on it; a torn last line (a crash mid-write) is ignored and cut
off on the next open, never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import aiofiles
import aiofiles.os

from . import fileutil
from .errors import EXIT_CANTCREAT, OutputLockedError, RunAborted, RunDirectoryError, UsageError
from .filenames import (  # noqa: F401 - re-exported: the store's public names since 0.1
    FilenameTemplateError,
    check_filename_template,
    render_filename,
    safe_component,
)
from .fileutil import copy_atomic
from .models import (
    FILES_FIELD,
    OK_LINE,
    FileRecord,
    RecordError,
    Result,
    WebhookRequest,
    WorkItem,
)

STATE_DIR = ".batchflux"
RESULTS_NAME = "results.jsonl"
SUMMARY_NAME = "summary.json"
JOURNAL_NAME = "journal.jsonl"
ITEM_KEYS_NAME = "item-keys.bin"
LOCK_NAME = "lock"

EXTENSIONS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}


# --------------------------------------------------------------------------------------------
# Reading JSONL: a bad line is skipped and reported, never the end of the file


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line of a JSONL file that a reader skipped: ``FILE:LINE: reason``.

    ``line`` is 1-based. Every reader reports each bad line it meets and goes on with the next
    one, so one damaged line never hides the lines after it.
    """

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}; line skipped"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason}


#: Called with each line a reader skips.
OnBadLine = Callable[[BadLine], None]

_log = logging.getLogger("batchflux")
_MAX_FRAGMENT = 1 << 20  # an unterminated last line longer than this is not worth parsing


def _warn(bad: BadLine) -> None:
    """The default for readers given no ``on_bad_line``: a warning on the batchflux logger."""
    _log.warning("%s", bad)


def _parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)`` for a line holding one JSON object, else ``(None, why not)``.

    A last line without its newline is a torn write unless it parses whole (then a person
    or another tool saved it without the final newline, and it counts).
    """
    terminated = raw.endswith(b"\n")
    if terminated and not raw.strip():
        return None, "blank line"
    try:
        record = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        if not terminated:
            return None, ("unfinished last line (a crash mid-write); it is cut off when a run "
                          "next opens the directory")
        return None, "not valid JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    return record, None


def iter_jsonl(path: Path, *, on_bad_line: OnBadLine | None = None
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(byte_offset_after_line, record)`` for every line that holds a JSON object.

    Blank lines, garbage and an unfinished last line are skipped; each is passed to
    ``on_bad_line`` (default: a warning on the ``batchflux`` logger) and reading goes on.
    A missing file yields nothing.
    """
    for _, offset, record in _read_jsonl(path, on_bad_line or _warn):
        yield offset, record


def iter_jsonl_numbered(path: Path, *, on_bad_line: OnBadLine | None = None
                        ) -> Iterator[tuple[int, dict[str, Any]]]:
    """As :func:`iter_jsonl`, but yield ``(line_number, record)`` (1-based)."""
    for number, _, record in _read_jsonl(path, on_bad_line or _warn):
        yield number, record


def _read_jsonl(path: Path, report: OnBadLine) -> Iterator[tuple[int, int, dict[str, Any]]]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - a generator closes it in the with below
    except FileNotFoundError:
        return
    with fh:
        offset = 0
        for number, raw in enumerate(fh, start=1):
            offset += len(raw)
            record, reason = _parse_line(raw)
            if record is None:
                report(BadLine(str(path), number, reason or "unreadable"))
                continue
            yield number, offset, record


def repair_jsonl(path: Path) -> bool:
    """Mend the end of a JSONL file after a crash. True when the file was changed.

    Every line is written whole by one ``write`` in append mode, so only an unterminated last
    fragment can be torn: it is cut off (or, when it parses as a whole JSON object, given its
    newline). Nothing before the last newline is ever touched: a bad line in the middle stays
    where it is and readers skip it with a warning, so no good line after it can be lost.
    Only the tail is read, so a million-line results file is repaired at once.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "r+b") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return False
        end, pos = 0, size
        while pos > 0:
            start = max(0, pos - (1 << 16))
            fh.seek(start)
            cut = fh.read(pos - start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            pos = start
        whole = False
        if size - end <= _MAX_FRAGMENT:
            fh.seek(end)
            whole = _parse_line(fh.read())[0] is not None
        if whole:
            fh.seek(size)
            fh.write(b"\n")
        else:
            fh.truncate(end)
        fh.flush()
        os.fsync(fh.fileno())
    return True


# --------------------------------------------------------------------------------------------
# The resume index: what earlier runs already finished, in bounded memory


def key_id(key: str) -> int:
    """64 bits of an item key: enough to tell a million items apart, 8 bytes each in memory."""
    return int(key[:16], 16)


_OK_LINE = OK_LINE  # the shape Result.to_json gives an ok line
_KEY_PREFIX = re.compile(r"[0-9a-fA-F]{16}")


def _iter_results(path: Path, on_bad_line: OnBadLine
                  ) -> Iterator[tuple[int, Result | _PartialLine | None, bytes]]:
    """``(key id, line, raw line)`` for each good line of results.jsonl; a bad line (blank,
    garbage, no item key, an unfinished last line) goes to ``on_bad_line`` and reading goes
    on. Lines the runner wrote for an ok item (``key`` first, top-level ``status`` before any
    nested object) are recognised by a pattern and give ``line=None``, without a JSON parse;
    every other line is parsed once, in full, and read by :func:`_read_line`.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return
    match = _OK_LINE.match
    with fh:
        for number, raw in enumerate(fh, start=1):
            if raw.endswith(b"}\n"):
                found = match(raw)
                if found is not None:
                    yield int(found.group(1), 16), None, raw
                    continue
            record, reason = _parse_line(raw)
            if record is not None:
                key = record.get("key")
                if isinstance(key, str) and _KEY_PREFIX.match(key):
                    yield key_id(key), _read_line(record), raw
                    continue
                reason = "no item key"
            on_bad_line(BadLine(str(path), number, reason or "unreadable"))


def _sorted_unique(values: array[int]) -> array[int]:
    ordered = sorted(values)
    out = array("Q")
    previous = None
    for value in ordered:
        if value != previous:
            out.append(value)
            previous = value
    return out


@dataclass(frozen=True, slots=True)
class PriorResult:
    """What an earlier run recorded for an item that did not end ok (or whose files are gone)."""

    category: str | None
    retryable: bool
    submission: int
    job_id: str | None


@dataclass(frozen=True, slots=True)
class _PartialLine:
    """A result line with an item key that :meth:`Result.from_json` refuses: written by hand
    or cut down (no ``index``, an error without its message, files without their sizes...).

    A resume still honours what such a line says, as it always has: an ok line dropped here
    would make the next run pay for its item again. Only what the resume index needs is read
    from it (:func:`_partial_line`); every line the runner writes is a whole :class:`Result`.
    """

    ok: bool
    files: Any  # the line's ``files`` as JSON has it (see _FileCheck.all_listed)
    prior: PriorResult


def _read_line(record: Mapping[str, Any]) -> Result | _PartialLine:
    """A parsed result line as its record type (a :class:`_PartialLine` when it is not one)."""
    try:
        return Result.from_json(record)
    except RecordError:
        return _partial_line(record)


def _partial_line(record: Mapping[str, Any]) -> _PartialLine:
    error = record.get("error")
    if not isinstance(error, Mapping):
        error = {}
    category, job_id = error.get("category"), record.get("job_id")
    try:
        submission = int(record.get("submission") or 0)
    except (TypeError, ValueError):
        submission = 0
    return _PartialLine(
        ok=record.get("status") == "ok", files=record.get("files"),
        prior=PriorResult(category=category if isinstance(category, str) else None,
                          retryable=bool(error.get("retryable")), submission=submission,
                          job_id=job_id if isinstance(job_id, str) else None))


def _prior(line: Result | _PartialLine) -> PriorResult:
    """What a result line tells a retry of its item: the error's category and whether it is
    retryable, the submission number and the jobId."""
    if isinstance(line, _PartialLine):
        return line.prior
    error = line.error
    return PriorResult(category=None if error is None else error.category.value,
                       retryable=error is not None and error.retryable,
                       submission=line.submission, job_id=line.job_id)


@dataclass(frozen=True, slots=True)
class JournalIntent:
    """A submit that was sent (or about to be) without its jobId being journaled after it.

    ``inputs`` are the ``input_images`` URLs that submit carried (local files as the upload URL
    they were sent as) and ``webhook`` its webhook fields (None: it had none), so that a resend
    is byte-for-byte the same request and the API answers it with the original job; ``at`` is
    the Unix time it was journaled.
    """

    submission: int
    inputs: tuple[str, ...] | None = None
    at: float | None = None
    webhook: WebhookRequest | None = None


@dataclass(frozen=True, slots=True)
class JournalUpload:
    """A reference image uploaded by an earlier run: its URL and when the API forgets it."""

    url: str
    expires_at: str | None


def item_keys_path(out_dir: Path) -> Path:
    """Where a run directory keeps the key ids of its manifest's items."""
    return out_dir / STATE_DIR / ITEM_KEYS_NAME


def read_item_keys(out_dir: Path) -> array | None:  # type: ignore[type-arg]
    """The key ids of the items of the manifest the latest run of ``out_dir`` ran (sorted),
    or None for a directory of an older batchflux (every item then counts).

    A file that is not what :func:`save_item_keys` writes (a length that is not a whole
    number of keys, keys out of order or repeated, a directory) raises
    :class:`~batchflux.errors.RunDirectoryError` naming it: guessing would hide or show the
    wrong items.
    """
    path = item_keys_path(out_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunDirectoryError(f"{path}: cannot be read ({exc.strerror or exc}); "
                                f"{_KEYS_ADVICE}") from exc
    keys = array("Q")
    if len(raw) % keys.itemsize:
        raise RunDirectoryError(f"{path}: damaged ({len(raw)} bytes, not a whole number of "
                                f"{keys.itemsize}-byte item keys); {_KEYS_ADVICE}")
    keys.frombytes(raw)
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise RunDirectoryError(f"{path}: damaged (item keys out of order or repeated); "
                                f"{_KEYS_ADVICE}")
    return keys


_KEYS_ADVICE = ("it lists the items of the manifest that reports and exports show; "
                "running the manifest again on this directory writes it anew")


def save_item_keys(out_dir: Path, keys: array) -> None:  # type: ignore[type-arg]
    """Record ``keys`` (sorted distinct key ids) as the items of ``out_dir``'s manifest
    (:func:`read_item_keys` reads them). Atomic: readers see the old file or the new one."""
    path = item_keys_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fileutil.write_atomic(path, keys.tobytes())


def forget_item_keys(out_dir: Path) -> None:
    """Remove ``out_dir``'s record of its manifest's items: every item counts as in the
    manifest again (what a directory of an older batchflux, without one, means)."""
    with contextlib.suppress(FileNotFoundError):
        item_keys_path(out_dir).unlink()


def in_keys(keys: array, key: str) -> bool:  # type: ignore[type-arg]
    """True when the item ``key`` is one of ``keys`` (from :func:`read_item_keys`); never for
    a key batchflux did not make (not hex: a hand-edited line)."""
    try:
        kid = key_id(key)
    except ValueError:
        return False
    pos = bisect_left(keys, kid)
    return pos < len(keys) and keys[pos] == kid


class ResumeIndex:
    """What ``results.jsonl`` and the journal say about earlier runs.

    ``ok`` keys live in a sorted ``array('Q')`` (8 bytes an item, so a million finished items
    cost 8 MB); failed items and journaled-but-unfinished jobs are few and kept in dicts.

    An ok line whose image files are gone (or changed size) is not ok: with ``check_files``
    it goes to :attr:`missing`, so that the run fetches its images again (re-attaching to its
    job while the provider still has the images, else generating it anew).

    The journal tells, per item, the latest submission sent (:attr:`intents`) and the latest
    job accepted (:attr:`jobs`); neither is dropped for an item that failed, because a retry
    of that item must reuse what the journal knows instead of paying for a new job.
    """

    def __init__(self) -> None:
        self._ok = array("Q")
        self.failed: dict[int, PriorResult] = {}
        self.missing: dict[int, PriorResult] = {}
        self.jobs: dict[int, tuple[int, str]] = {}  # key id -> (submission number, jobId)
        self.intents: dict[int, JournalIntent] = {}  # key id -> submission sent, jobId unknown
        # key id -> when the submit of its journaled job was first sent (Unix time)
        self.sent: dict[int, float] = {}
        self.results_lines = 0
        self.uploads: dict[str, JournalUpload] = {}  # content sha256 -> upload
        #: Lines of results.jsonl and the journal that were skipped (blank, garbage), in order.
        self.bad_lines: list[BadLine] = []

    @classmethod
    def load(cls, out_dir: Path, *, check_files: bool = True) -> ResumeIndex:
        index = cls()
        ok_ids = array("Q")
        present = _FileCheck(out_dir) if check_files else None
        for kid, line, raw in _iter_results(out_dir / RESULTS_NAME, index.bad_lines.append):
            index.results_lines += 1
            if line is None or line.ok:
                if present is not None and not present.line_there(line, raw):
                    whole = line if line is not None else _read_line(json.loads(raw))
                    index.missing[kid] = replace(_prior(whole), category="download_failed",
                                                 retryable=True)
                    index.failed.pop(kid, None)
                    continue
                ok_ids.append(kid)
                if index.failed:
                    index.failed.pop(kid, None)
                if index.missing:
                    index.missing.pop(kid, None)
                continue
            index.failed[kid] = _prior(line)
            index.missing.pop(kid, None)
        index._ok = _sorted_unique(ok_ids)
        # An ok line for a key that also appears missing (the same key twice) keeps it ok.
        for kid in [k for k in index.missing if index._has_ok(k)]:
            del index.missing[kid]
        for _, record in iter_jsonl(out_dir / STATE_DIR / JOURNAL_NAME,
                                    on_bad_line=index.bad_lines.append):
            kind = record.get("t")
            if kind == "upload":
                index.uploads[str(record.get("sha256"))] = JournalUpload(
                    str(record.get("url")), record.get("expires_at"))
                continue
            key = record.get("key")
            if not isinstance(key, str) or not _KEY_PREFIX.match(key):
                continue
            kid = key_id(key)
            n = record.get("n", 0)
            if not isinstance(n, int):
                continue
            if kind == "intent":
                inputs = record.get("inputs")
                index.intents[kid] = JournalIntent(
                    n, tuple(str(u) for u in inputs) if isinstance(inputs, list) else None,
                    float(record["at"]) if isinstance(record.get("at"), (int, float)) else None,
                    _journaled_webhook(record.get("webhook")))
            elif kind == "lost":
                if index.jobs.get(kid, (None,))[0] == n:
                    del index.jobs[kid]
            elif kind == "job":
                index.jobs[kid] = (n, str(record.get("job_id")))
                intent = index.intents.get(kid)
                index.sent.pop(kid, None)
                if intent is not None and intent.submission == n and intent.at is not None:
                    index.sent[kid] = intent.at
                if intent is not None and intent.submission <= n:
                    del index.intents[kid]
        # An ok result closes the item's journal entries, whatever the journal says; a failed
        # one does not (its retry must reuse the key or the job the journal knows).
        for table in (index.jobs, index.intents, index.sent):
            for kid in [k for k in table if index._has_ok(k)]:
                del table[kid]
        return index

    def _has_ok(self, kid: int) -> bool:
        pos = bisect_left(self._ok, kid)
        return pos < len(self._ok) and self._ok[pos] == kid

    def is_ok(self, key: str) -> bool:
        return self._has_ok(key_id(key))

    def mark_ok(self, key: str) -> None:
        """Record that ``key`` ended ok in this run (kept sorted; O(n) insert, used rarely)."""
        kid = key_id(key)
        if not self._has_ok(kid):
            self._ok.insert(bisect_left(self._ok, kid), kid)
        self.failed.pop(kid, None)
        self.missing.pop(kid, None)

    @property
    def ok_count(self) -> int:
        return len(self._ok)

    def prior_failure(self, key: str) -> PriorResult | None:
        return self.failed.get(key_id(key))

    def missing_files(self, key: str) -> PriorResult | None:
        """The ok result of ``key`` whose image files are no longer there (or None)."""
        return self.missing.get(key_id(key))

    def journaled_job(self, key: str) -> tuple[int, str] | None:
        return self.jobs.get(key_id(key))

    def journaled_intent(self, key: str) -> JournalIntent | None:
        return self.intents.get(key_id(key))

    def journaled_sent(self, key: str) -> float | None:
        """When the submit of ``key``'s journaled job was first sent (Unix time; None: an
        older journal, or no job)."""
        return self.sent.get(key_id(key))


class _FileCheck:
    """Whether an ok line's files are all there with their recorded size (a stat each)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def line_there(self, line: Result | _PartialLine | None, raw: bytes) -> bool:
        """For an ok line as :func:`_iter_results` gives it (None: read by the fast path)."""
        if line is None:
            return self.all_listed(_files_of(raw))
        if isinstance(line, Result):
            return self.all_there(line.files)
        return self.all_listed(line.files)

    def all_there(self, files: Sequence[FileRecord]) -> bool:
        """For a line read as a :class:`Result`."""
        return bool(files) and all(self._there(f.path, f.bytes) for f in files)

    def all_listed(self, files: Any) -> bool:
        """The same for a ``files`` list as JSON has it. The fast path parses that list alone
        and reads ``path`` and ``bytes`` from it as they are: typing each entry as a
        :class:`FileRecord` made loading a third slower (22 against 16.5 us a line, 20,000
        runner-shaped lines). A :class:`_PartialLine` keeps its list as written."""
        if not isinstance(files, list) or not files:
            return False
        for entry in files:
            if not isinstance(entry, dict) or not self._there(entry.get("path"),
                                                              entry.get("bytes")):
                return False
        return True

    def _there(self, rel: object, size: object) -> bool:
        if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/"):
            return False
        try:
            return os.stat(self.out_dir / rel).st_size == size
        except OSError:
            return False


_FILES = FILES_FIELD


def _files_of(raw: bytes) -> Any:
    """The ``files`` list of a result line read by the fast path, parsed alone.

    A JSON string cannot contain ``,"files":[`` unescaped, so the first match is the field.
    """
    found = _FILES.search(raw)
    if found is None:
        return None
    try:
        return json.loads(found.group(1))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# The lock


class DirectoryLock:
    """An exclusive lock on an output directory, held by the kernel.

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a descriptor of the lock file that stays open while
    the lock is held: the kernel releases it when the holder closes it or dies (SIGKILL,
    OOM, power loss of a network client), so there is no stale lock to detect and no race
    between processes taking one over. Two descriptors conflict even inside one process, so
    a second run in the same process is refused too. The holder's pid is written into the
    file after locking, only so that the refusal can name it; nothing is decided from it.
    The file is never unlinked (a holder and a newcomer could then lock different inodes).

    >>> lock = DirectoryLock(Path("out/nightly/.batchflux/lock"))
    >>> with lock:
    ...     DirectoryLock(Path("out/nightly/.batchflux/lock")).acquire()
    Traceback (most recent call last):
    ...
    batchflux.errors.OutputLockedError: ...
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def is_held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`~batchflux.errors.OutputLockedError` (exit 75) at
        once; :class:`~batchflux.errors.RunAborted` (exit 73) when the file cannot be opened."""
        if self._fd is not None:
            raise OutputLockedError(f"{self._directory} is already locked by this run")
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise _unwritable(exc, self.path, "cannot lock") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            named = f"pid {holder}" if holder else "pid unknown"
            raise OutputLockedError(f"{self._directory} is in use by another batchflux run "
                                    f"({named}); wait for it to finish") from None
        except OSError as exc:
            os.close(fd)
            raise _unwritable(exc, self.path, "cannot lock") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for messages; the kernel holds the lock either way
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (closing the descriptor releases it). Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # while still locked: no holder's pid is left behind
        os.close(fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def _directory(self) -> Path:
        return self.path.parent.parent if self.path.parent.name == STATE_DIR else self.path.parent


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The store


class TempImage:
    """A partial download: streamed to ``.batchflux/tmp``, hashed as it goes."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self._handle = handle
        self._hash = hashlib.sha256()
        self.size = 0

    async def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        await self._handle.write(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def _is_disk_full(exc: OSError) -> bool:
    """True when a write failed for want of space: the disk is full or the quota used up."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


_REFUSALS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ELOOP: "a symbolic link, refused",
}


def _unwritable(exc: OSError, path: Path | str, doing: str = "cannot write") -> RunAborted:
    """The run-fatal error (exit 73) for a write the file system refused: says why in words
    (permission denied, read-only file system, no space, quota) and names the path."""
    where = exc.filename if isinstance(exc.filename, str) and exc.filename else path
    reason = _REFUSALS.get(exc.errno or 0) or exc.strerror or str(exc)
    return RunAborted(f"{doing} {where}: {reason}", exit_code=EXIT_CANTCREAT)


_TEMP_NUMBERS = itertools.count(1)  # per process: every download's temp file has its own name


class RunStore:
    """All writes to one output directory. Open it with :meth:`open`; close it when done."""

    def __init__(self, out_dir: Path, *, filename_template: str) -> None:
        self.out_dir = out_dir
        self.images_dir = out_dir / "images"
        self.state_dir = out_dir / STATE_DIR
        self.tmp_dir = self.state_dir / "tmp"
        self.results_path = out_dir / RESULTS_NAME
        self.summary_path = out_dir / SUMMARY_NAME
        self.journal_path = self.state_dir / JOURNAL_NAME
        problem = check_filename_template(filename_template, relative_only=False)
        if problem is not None:
            raise UsageError(f"file-name template {filename_template!r}: {problem}")
        self.filename_template = filename_template
        self._lock = DirectoryLock(self.state_dir / LOCK_NAME)
        self._journal_fd: int | None = None
        self._results_fd: int | None = None
        self.repaired: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> ResumeIndex:
        """Create the layout, take the lock, repair torn tails, sweep temp files, and return
        what earlier runs left (the resume index)."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._refuse_symlink(self.out_dir)
            for directory in (self.state_dir, self.images_dir, self.tmp_dir):
                self._refuse_symlink(directory)
                directory.mkdir(exist_ok=True)
            for path in (self.results_path, self.journal_path, self.summary_path):
                self._refuse_symlink(path)
        except OSError as exc:
            raise _unwritable(exc, self.out_dir, "cannot create the output directory") from exc
        self._lock.acquire()
        try:
            for path in (self.results_path, self.journal_path):
                if repair_jsonl(path):
                    self.repaired.append(path.name)
            for leftover in self.tmp_dir.iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
            index = ResumeIndex.load(self.out_dir)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
            self._journal_fd = os.open(self.journal_path, flags, 0o644)
            self._results_fd = os.open(self.results_path, flags, 0o644)
        except OSError as exc:
            self.close()
            raise _unwritable(exc, self.out_dir) from exc
        except BaseException:
            self.close()
            raise
        return index

    def close(self) -> None:
        for name in ("_journal_fd", "_results_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                os.close(fd)
                setattr(self, name, None)
        self._lock.release()

    def _refuse_symlink(self, path: Path) -> None:
        if path.is_symlink():
            raise RunAborted(f"refusing to write through the symlink {path}",
                             exit_code=EXIT_CANTCREAT)

    # -- journal -------------------------------------------------------------------------------

    def _append(self, fd: int | None, record: Mapping[str, Any]) -> None:
        if fd is None:
            raise RunAborted("the run store is closed")
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        before: int | None = None
        try:
            before = os.fstat(fd).st_size
            written = os.write(fd, line)
            if written != len(line):  # short write: the disk is full
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            if before is not None:  # cut the partial line off rather than leave it torn
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, before)
            path = self.journal_path if fd == self._journal_fd else self.results_path
            raise _unwritable(exc, path) from exc

    def journal_intent(self, item: WorkItem, submission: int,
                       inputs: Sequence[str] | None = None,
                       webhook: WebhookRequest | None = None) -> None:
        """Recorded before a submit is sent: a crash before we learn the jobId resubmits with
        the same Idempotency-Key *and the same body*, which the API answers with the original
        job. ``inputs`` are the ``input_images`` URLs the body carries (upload URLs change from
        one upload to the next, so a resend must reuse these, not upload again); ``webhook``
        its webhook fields (a resumed run may be given another webhook URL, or none)."""
        record: dict[str, Any] = {"t": "intent", "key": item.key, "n": submission,
                                  "at": round(time.time(), 3)}
        if inputs:
            record["inputs"] = list(inputs)
        if webhook is not None:
            record["webhook"] = {"url": webhook.url, "events": list(webhook.events)}
        self._append(self._journal_fd, record)

    def journal_job(self, item: WorkItem, submission: int, job_id: str) -> None:
        """Recorded (written through to the OS) before anyone waits on the job."""
        self._append(self._journal_fd,
                     {"t": "job", "key": item.key, "n": submission, "job_id": job_id})

    def journal_lost(self, item: WorkItem, submission: int, job_id: str) -> None:
        """The API no longer knows a journaled job: the item is submitted anew."""
        self._append(self._journal_fd,
                     {"t": "lost", "key": item.key, "n": submission, "job_id": job_id})

    def journal_upload(self, sha256: str, url: str, expires_at: str | None) -> None:
        self._append(self._journal_fd,
                     {"t": "upload", "sha256": sha256, "url": url, "expires_at": expires_at})

    def sync(self) -> None:
        """fsync journal and results (called periodically, off the event loop)."""
        for fd in (self._journal_fd, self._results_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(fd)

    # -- results ---------------------------------------------------------------------------------

    def append_result(self, record: Result) -> None:
        """Append one result line (written whole by one ``write``, or not at all)."""
        self._append(self._results_fd, record.to_json())

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.summary_path, summary)

    def write_item_keys(self, keys: array) -> None:  # type: ignore[type-arg]
        """Record the key ids of the current manifest's items (sorted, 8 bytes each): what
        reports and exports mean by "the items of the manifest" (:func:`read_item_keys`)."""
        save_item_keys(self.out_dir, keys)

    def freeze_manifest(self, manifest_path: Path) -> None:
        """Keep a copy of the manifest this run used (it holds no secrets: keys come from the
        environment or a key file, never from a manifest)."""
        copy_atomic(manifest_path, self.state_dir / f"manifest{manifest_path.suffix or '.txt'}")

    # -- images ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def temp_image(self, item: WorkItem, number: int):  # type: ignore[no-untyped-def]
        """A temp file for one download; removed on any failure or cancellation. Its name is
        unique to this download (pid and a per-process counter), so two workers fetching the
        same key at once never share one."""
        unique = f"{os.getpid()}-{next(_TEMP_NUMBERS)}"
        path = self.tmp_dir / f"{item.key[:24]}-{number}-{unique}.part"
        try:
            async with aiofiles.open(path, "wb") as handle:
                temp = TempImage(path, handle)
                yield temp
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            if exc.errno in _REFUSALS:
                raise _unwritable(exc, path, "cannot write the image") from exc
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def final_path(self, item: WorkItem, *, ext: str, number: int, width: int,
                   height: int) -> tuple[Path, str]:
        """Where a verified image goes, as (absolute path, path relative to OUT)."""
        rel = render_filename(self.filename_template, item, ext=ext, image_number=number,
                              width=width, height=height)
        target = self.images_dir / rel
        root = os.path.realpath(self.images_dir)
        parent = os.path.realpath(target.parent) if target.parent.exists() else None
        if parent is not None and not (parent == root or parent.startswith(root + os.sep)):
            raise RunAborted(f"refusing to write outside {self.images_dir}: "
                             f"{target.parent} leads elsewhere", exit_code=EXIT_CANTCREAT)
        return target, f"images/{rel}"

    async def commit_image(self, temp: TempImage, item: WorkItem, *, ext: str, number: int,
                           width: int, height: int, fmt: str,
                           check: str = "decode") -> FileRecord:
        """Move a verified temp file to its final name atomically."""
        target, rel = self.final_path(item, ext=ext, number=number, width=width, height=height)
        try:
            await aiofiles.os.makedirs(target.parent, exist_ok=True)
            # Re-check after creating directories: a planted symlink must not redirect us.
            root = os.path.realpath(self.images_dir)
            parent = os.path.realpath(target.parent)
            if not (parent == root or parent.startswith(root + os.sep)):
                raise RunAborted(f"refusing to write outside {self.images_dir}",
                                 exit_code=EXIT_CANTCREAT)
            if target.is_symlink():
                target.unlink()
            await aiofiles.os.replace(temp.path, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.path.unlink()
            raise _unwritable(exc, target, "cannot write the image") from exc
        return FileRecord(rel, temp.sha256, temp.size, width, height, fmt, check)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as ``path`` (indented JSON) atomically and durably: the run directory's
    name for :func:`batchflux.fileutil.write_json_atomic`."""
    fileutil.write_json_atomic(path, data)


def _journaled_webhook(value: Any) -> WebhookRequest | None:
    """The webhook fields of a journaled intent (None: the submit carried none)."""
    if not isinstance(value, dict) or not isinstance(value.get("url"), str):
        return None
    events = value.get("events")
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        return WebhookRequest(value["url"])
    return WebhookRequest(value["url"], tuple(events))
