"""Review decisions are data: ``OUT/review.jsonl``, one line per click or key press.

::

    {"key": "<item key>", "decision": "accept", "time": "2026-12-01T21:40:02.123Z"}
    {"key": "<item key>", "decision": "star", "time": "...", "note": "the best one"}

``decision`` is one of ``accept``, ``reject``, ``star`` or ``clear`` (back to undecided);
``time`` is UTC ISO 8601; ``note`` is optional. The schema is ``schemas/review.schema.json``.
The file is only ever appended to, and the last line for a key wins, so it is also the history
of the review. Each line is written whole, at once, under two locks: an in-process lock and
``fcntl.flock`` on the file itself, so two browser tabs, two reviewers or two processes never
interleave or tear lines. A torn last line (a crash mid-write) is skipped by the reader and
closed off by the next append.

>>> from batchflux import read_results
>>> first = read_results("out/nightly").ordered()[0].key
>>> _ = append_decision("out/nightly", first, "accept")
>>> decisions = read_decisions("out/nightly")
>>> [k for k, d in decisions.items() if d.state == "accepted"] == [first]
True

This module imports nothing from the web app: exports and reports use it too.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "REVIEW_NAME",
    "STATES",
    "Decision",
    "DecisionKind",
    "append_decision",
    "count_states",
    "read_decisions",
    "review_state",
]

REVIEW_NAME = "review.jsonl"
#: What an item with an image can be, after review: the partition ``report --json`` counts and
#: ``export --only`` selects from.
STATES = ("accepted", "rejected", "starred", "undecided")
MAX_NOTE = 2000


class DecisionKind(StrEnum):
    """What one line of ``review.jsonl`` says about its item."""

    ACCEPT = "accept"
    REJECT = "reject"
    STAR = "star"
    CLEAR = "clear"

    @property
    def state(self) -> str:
        """The item's state after this decision: ``accepted``, ..., ``undecided``."""
        return _STATE_OF[self]


_STATE_OF = {DecisionKind.ACCEPT: "accepted", DecisionKind.REJECT: "rejected",
             DecisionKind.STAR: "starred", DecisionKind.CLEAR: "undecided"}


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Decision:
    """One line of ``review.jsonl``: ``key`` got ``decision`` at ``time`` (aware, UTC)."""

    key: str
    decision: DecisionKind
    time: datetime
    note: str | None = None

    @property
    def state(self) -> str:
        """``accepted``, ``rejected``, ``starred`` or ``undecided`` (after ``clear``)."""
        return self.decision.state

    def to_json(self) -> dict[str, Any]:
        """The line as written (``note`` only when there is one)."""
        line: dict[str, Any] = {"key": self.key, "decision": self.decision.value,
                                "time": _format_time(self.time)}
        if self.note is not None:
            line["note"] = self.note
        return line

    @classmethod
    def from_json(cls, data: Any) -> Decision:
        """Parse one line's object; ``ValueError`` when it is not a decision."""
        if not isinstance(data, dict) or set(data) - {"key", "decision", "time", "note"}:
            raise ValueError("not a decision object")
        key, note = data.get("key"), data.get("note")
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty string")
        if note is not None and not isinstance(note, str):
            raise ValueError("note must be a string")
        time = datetime.fromisoformat(str(data.get("time")))
        if time.tzinfo is None:
            raise ValueError("time must carry its time zone")
        return cls(key, DecisionKind(str(data.get("decision"))), time.astimezone(UTC), note)


def _lines(path: Path) -> Iterator[Decision]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    for line in raw.splitlines():
        try:
            yield Decision.from_json(json.loads(line))
        except ValueError:  # a torn or hand-mangled line: the others still count
            continue


def read_decisions(out_dir: str | os.PathLike[str]) -> dict[str, Decision]:
    """The current decision of each item of run ``out_dir``, by key.

    The last line for a key wins; keys whose last line is ``clear`` are left out (they are
    undecided). Lines that are not valid decisions are skipped.
    """
    current: dict[str, Decision] = {}
    for decision in _lines(Path(out_dir) / REVIEW_NAME):
        if decision.decision is DecisionKind.CLEAR:
            current.pop(decision.key, None)
        else:
            current[decision.key] = decision
    return current


def review_state(key: str, decisions: Mapping[str, Decision]) -> str:
    """The state of item ``key``: one of :data:`STATES`."""
    decision = decisions.get(key)
    return "undecided" if decision is None else decision.state


def count_states(keys: Iterable[str], decisions: Mapping[str, Decision]) -> dict[str, int]:
    """How many of ``keys`` are in each of :data:`STATES` (every state present)."""
    counts = dict.fromkeys(STATES, 0)
    for key in keys:
        counts[review_state(key, decisions)] += 1
    return counts


_APPEND_LOCK = threading.Lock()  # threads of one process (the app's worker threads)


def append_decision(out_dir: str | os.PathLike[str], key: str, decision: DecisionKind | str, *,
                    note: str | None = None, now: datetime | None = None) -> Decision:
    """Append one decision to ``OUT/review.jsonl`` and return it (written and fsynced).

    ``ValueError`` for a decision that is not one of :class:`DecisionKind` or a note that is
    too long. Whether ``key`` belongs to the run is the caller's business.
    """
    if note is not None and len(note) > MAX_NOTE:
        raise ValueError(f"a note holds at most {MAX_NOTE} characters")
    made = Decision(key, DecisionKind(decision), (now or datetime.now(UTC)).astimezone(UTC),
                    note)
    data = (json.dumps(made.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
    path = Path(out_dir) / REVIEW_NAME
    with _APPEND_LOCK:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # other processes; released by close
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # close a torn line off so it cannot swallow this one
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    return made
