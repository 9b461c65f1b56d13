"""The simulator's world on disk: an append-only journal of every change, replayed on start.

A state directory holds::

    lock                  held (``fcntl.flock``) by the simulator that has the directory open
    journal.jsonl         a header line, then one JSON record per change, oldest first
    uploads/<id>.<ext>    the bytes of each upload (the journal holds its metadata)

Each record is written with a single ``os.write`` on an ``O_APPEND`` descriptor, *before* the
change is visible to any client, so a process killed at any instant leaves at most its last
line torn; opening the directory again drops that line. Nothing is fsynced: the state survives
the death of the process (Ctrl-C, SIGKILL, a crash), not a power cut.

The first line names the format and its version; a version this code does not know is refused
with :class:`SimStateError` rather than half-read. Version 1 records (``type`` field first)::

    {"format":"batchflux-sim-state","version":1,"created":<unix s>}
    {"type":"credits","at":..,"balance":N}
    {"type":"job","at":..,"id":..,"owner":..,"model":..,"body":{..},"body_hash":..,
     "started":..,"ends":..,"error":null|"..","cost":N,"size":[W,H],"output_format":..,
     "quality":N,"seed":N,"base_url":..,"idempotency_key":null|"..",
     "idempotency_expires":null|..}
    {"type":"upload","at":..,"id":..,"owner":..,"content_type":..,"kind":..,"ext":..,
     "expires":..,"byte_size":N}
    {"type":"cancel","at":..,"job_id":..}
    {"type":"webhook","at":..,"job_id":..,"status":"delivered"|"failed"}

``owner`` is the public id of the API key (``key_id``), never the key itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from ..fileutil import write_atomic

FORMAT = "batchflux-sim-state"
VERSION = 1

JOURNAL_NAME = "journal.jsonl"
LOCK_NAME = "lock"
UPLOADS_DIR = "uploads"

_TAIL_CHUNK = 64 * 1024


class SimStateError(Exception):
    """A simulator state directory that cannot be used: an unknown format version, a corrupt
    journal, a directory another process holds, or a journal that could not be written."""


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobCreated:
    """A job was created and paid for (and, with ``idempotency_key``, remembered under it)."""

    TYPE: ClassVar[str] = "job"

    at: float  # its createdAt
    id: str
    owner: str
    model: str
    body: dict[str, Any]
    body_hash: str
    started: float
    ends: float
    error: str | None
    cost: int
    size: tuple[int, int]
    output_format: str
    quality: int
    seed: int
    base_url: str
    idempotency_key: str | None = None
    idempotency_expires: float | None = None


@dataclass(frozen=True, slots=True)
class UploadStored:
    """A file was uploaded; its bytes are in ``uploads/<file_name>``."""

    TYPE: ClassVar[str] = "upload"

    at: float
    id: str
    owner: str
    content_type: str
    kind: str
    ext: str
    expires: float
    byte_size: int

    @property
    def file_name(self) -> str:
        """The name of the file that holds the upload's bytes (also its URL's last part)."""
        return f"{self.id}.{self.ext}"


@dataclass(frozen=True, slots=True)
class JobCancelled:
    """A job that had not ended was cancelled (and refunded) at ``at``."""

    TYPE: ClassVar[str] = "cancel"

    at: float
    job_id: str


@dataclass(frozen=True, slots=True)
class WebhookSettled:
    """A job's webhook deliveries are over: ``status`` is ``delivered`` or ``failed``."""

    TYPE: ClassVar[str] = "webhook"

    at: float
    job_id: str
    status: str


@dataclass(frozen=True, slots=True)
class CreditsSet:
    """The team's balance was set to ``balance`` (a new world, or the ``credits`` setting
    changed)."""

    TYPE: ClassVar[str] = "credits"

    at: float
    balance: int


Record = JobCreated | UploadStored | JobCancelled | WebhookSettled | CreditsSet

_RECORD_TYPES: dict[str, type[Record]] = {
    cls.TYPE: cls for cls in (JobCreated, UploadStored, JobCancelled, WebhookSettled, CreditsSet)
}
_FIELD_NAMES: dict[str, tuple[str, ...]] = {
    tag: tuple(f.name for f in fields(cls)) for tag, cls in _RECORD_TYPES.items()
}
_FIELDS = {tag: frozenset(names) for tag, names in _FIELD_NAMES.items()}
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_record(record: Record) -> bytes:
    """One journal line (with its newline) for ``record``."""
    data: dict[str, Any] = {"type": record.TYPE}
    for name in _FIELD_NAMES[record.TYPE]:  # shallow: asdict would deep-copy the body
        data[name] = getattr(record, name)
    return (_ENCODER.encode(data) + "\n").encode()


def decode_record(line: str | bytes) -> Record:
    """The record on one journal line. Raises ``ValueError`` for anything else."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    tag = data.pop("type", None)
    cls = _RECORD_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ValueError(f"unknown record type {tag!r}")
    if not data.keys() <= _FIELDS[tag]:
        raise ValueError(f"unknown fields {sorted(data.keys() - _FIELDS[tag])} in {tag!r}")
    if cls is JobCreated:
        data["size"] = tuple(data["size"])
    return cls(**data)


def _header(created: float) -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION, "created": created},
                      separators=(",", ":")).encode() + b"\n"


def _check_header(path: Path, line: bytes) -> None:
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not line.endswith(b"\n") or not isinstance(header, dict) or \
            header.get("format") != FORMAT:
        raise SimStateError(f"{path} is not a batchflux simulator state (its first line is not "
                            f'a {{"format": "{FORMAT}"}} header)')
    version = header.get("version")
    if version != VERSION:
        raise SimStateError(
            f"{path}: simulator state format version {version!r} is not supported (this "
            f"batchflux reads version {VERSION}); use the batchflux that wrote it, or remove "
            f"{path.parent} to start an empty simulator")


# -- the journal ----------------------------------------------------------------------------------

#: Journals open in this process, by resolved directory: opening a directory again in the same
#: process (a new app after an old one was dropped without ``close``) takes it over.
_OPEN: dict[Path, StateJournal] = {}


class StateJournal:
    """An open state directory: the lock, the append descriptor, the upload files.

    >>> import time
    >>> journal = StateJournal.open(Path("sim-state"), now=time.time())
    >>> for record in journal.records(): ...   # replay, once, before the first append
    >>> journal.append(CreditsSet(at=time.time(), balance=1000))
    >>> journal.close()
    """

    def __init__(self, directory: Path, lock_fd: int, append_fd: int, size: int) -> None:
        self.directory = directory
        self._key = directory.resolve()
        self.path = directory / JOURNAL_NAME
        self.uploads_dir = directory / UPLOADS_DIR
        self._lock_fd = lock_fd
        self._fd = append_fd
        self._size = size  # bytes of complete records: we are the only writer
        self._closed = False
        self._why_closed = "it was closed"

    @classmethod
    def open(cls, directory: Path, *, now: float) -> StateJournal:
        """Lock ``directory`` (created if missing), check or write the header, and drop a torn
        last line. Raises :class:`SimStateError` when it cannot be used."""
        directory = Path(directory).absolute()  # a later chdir must not move it
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / UPLOADS_DIR).mkdir(exist_ok=True)
            key = directory.resolve()
            lock_fd = _lock(directory, key)
        except OSError as exc:
            raise SimStateError(f"cannot open the simulator state in {directory}: {exc}") from exc
        try:
            path = directory / JOURNAL_NAME
            if not path.exists() or path.stat().st_size == 0:
                _write_fresh(path, now)
            with path.open("rb") as fh:
                _check_header(path, fh.readline())
            append_fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            size = _drop_torn_tail(append_fd)
        except OSError as exc:
            os.close(lock_fd)
            raise SimStateError(f"cannot open the simulator state in {directory}: {exc}") from exc
        except SimStateError:
            os.close(lock_fd)
            raise
        journal = cls(directory, lock_fd, append_fd, size)
        _OPEN[key] = journal
        return journal

    # -- reading ---------------------------------------------------------------------------

    def records(self) -> Iterator[Record]:
        """Every record after the header, oldest first, streamed (the file is never held in
        memory). Raises :class:`SimStateError` naming the line of a corrupt record."""
        with self.path.open(encoding="utf-8", newline="\n") as fh:
            fh.readline()
            for number, line in enumerate(fh, start=2):
                if not line.endswith("\n"):
                    break  # torn: cut off at open, so only if the file changed since
                try:
                    yield decode_record(line)
                except (ValueError, TypeError, KeyError) as exc:
                    raise SimStateError(f"{self.path}, line {number}: corrupt record ({exc}); "
                                        f"remove {self.directory} to start an empty "
                                        "simulator") from exc

    def read_upload(self, file_name: str) -> bytes | None:
        """The bytes of an upload, or None when its file is gone."""
        try:
            return (self.uploads_dir / file_name).read_bytes()
        except FileNotFoundError:
            return None

    # -- writing ---------------------------------------------------------------------------

    def append(self, record: Record) -> None:
        """Write one record, in one ``os.write``. Raises :class:`SimStateError` if it could not
        be written whole (the partial line is cut off again)."""
        self._check_open()
        line = encode_record(record)
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            self._cut_back()
            raise SimStateError(f"cannot write the simulator state {self.path}: {exc}") from exc
        if written != len(line):
            self._cut_back()
            raise SimStateError(f"cannot write the simulator state {self.path}: short write "
                                f"({written} of {len(line)} bytes)")
        self._size += written

    def store_upload(self, file_name: str, data: bytes) -> None:
        """Write an upload's bytes (whole, or not at all) before its record is appended."""
        self._check_open()
        try:
            write_atomic(self.uploads_dir / file_name, data, durable=False)
        except OSError as exc:
            raise SimStateError(f"cannot store an upload in {self.uploads_dir}: {exc}") from exc

    def prune_uploads(self, keep: set[str]) -> None:
        """Delete upload files not in ``keep`` (expired, reset, or never journaled)."""
        self._check_open()
        with os.scandir(self.uploads_dir) as entries:
            for entry in entries:
                if entry.name not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def reset(self, *, now: float) -> None:
        """Start an empty world: a journal with only its header, no upload files."""
        self._check_open()
        try:
            _write_fresh(self.path, now)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise SimStateError(f"cannot reset the simulator state {self.path}: {exc}") from exc
        os.close(self._fd)
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self.prune_uploads(set())

    def close(self, why: str = "it was closed") -> None:
        """Release the directory (idempotent). Appending afterwards raises."""
        if self._closed:
            return
        self._closed, self._why_closed = True, why
        os.close(self._fd)
        os.close(self._lock_fd)
        if _OPEN.get(self._key) is self:
            del _OPEN[self._key]

    @property
    def closed(self) -> bool:
        """True once the directory was released."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise SimStateError(f"the simulator state in {self.directory} is no longer open: "
                                f"{self._why_closed}")

    def _cut_back(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)


def _lock(directory: Path, key: Path) -> int:
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            earlier = _OPEN.get(key)
            if earlier is None:
                raise SimStateError(f"the simulator state in {directory} is in use by another "
                                    "process (a running simulator)") from None
            earlier.close("a newer simulator in this process opened the same directory")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_fresh(path: Path, now: float) -> None:
    """A journal holding only its header, put in place whole (not fsynced, as nothing here
    is: see the module doc)."""
    write_atomic(path, _header(now), durable=False)


def _drop_torn_tail(fd: int) -> int:
    """Cut the file after its last newline; return its new size."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)
    return end
