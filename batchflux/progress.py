"""Live progress: what a run tells a person or a machine while it works and when it ends.

(What a run *did*, read back from its directory afterwards, is :mod:`batchflux.report`.)

Three reporters behind one small interface (:class:`batchflux.runner.Reporter`):

- :class:`RichReporter` on a terminal: a live progress bar with done/total, ok/failed, images
  per minute, ETA, the current in-flight cap, and a visible "waiting for rate limit" state.
- :class:`LogReporter` elsewhere: a plain line every ``interval`` seconds (or none, quiet).
- :class:`JsonReporter` (``--log-format json``): one JSON event a line, for log shippers.

Every reporter names an item by :func:`~batchflux.display.item_label` (prompt id, aspect ratio
or custom size, template variables, seed, key prefix), so two failed items of one prompt are
told apart. Every run ends with :func:`summary_line`, one line that says what happened and
where the images, ``results.jsonl`` and ``summary.json`` are. No reporter ever sees the API
key.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .display import escape_controls, item_label, plural
from .models import Result, RunState

__all__ = ["JsonReporter", "LogReporter", "RichReporter", "summary_line"]


def _rate_per_minute(state: RunState, now: float) -> float:
    elapsed = now - state.started
    return state.ok * 60.0 / elapsed if elapsed > 0 else 0.0


def _eta_seconds(state: RunState, now: float) -> float | None:
    if not state.total:
        return None
    remaining = state.total - state.skipped - state.done
    elapsed = now - state.started
    if state.done == 0 or elapsed <= 0 or remaining <= 0:
        return None
    return remaining * elapsed / state.done


def _status_text(state: RunState) -> str:
    parts = [f"ok {state.ok}", f"failed {state.failed}"]
    if state.skipped:
        parts.append(f"skipped {state.skipped}")
    parts.append(f"in flight {state.inflight}/{state.inflight_cap}")
    if state.cooldown_remaining > 0.05:
        parts.append(f"waiting for rate limit {state.cooldown_remaining:.0f} s")
    if state.stop_reason:
        parts.append(f"stopping: {state.stop_reason}")
    return " · ".join(parts)


class RichReporter:
    """A live progress bar (stderr), for terminals. Honours NO_COLOR through rich."""

    def __init__(self, *, console: Console | None = None, banner: str | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.banner = banner
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]:.0f} img/min"),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        )
        self.task: Any = None
        self._state = RunState()

    def start(self, *, total: int | None, skipped: int, attached: int) -> None:
        """The run begins: print the banner and show the bar."""
        if self.banner:
            self.console.print(self.banner)
        self.progress.start()
        self.task = self.progress.add_task("generating", total=total, rate=0.0, status="")

    def result(self, record: Result) -> None:
        """One item finished: advance the bar; a failure gets a line of its own."""
        if self.task is not None:
            self.progress.advance(self.task)
        if record.error is not None:
            text = Text("failed", style="red")
            text.append(f" {item_label(record)}: {record.error.category.value}: "
                        f"{escape_controls(record.error.message)}")
            self.progress.console.print(text, highlight=False)

    def status(self, state: RunState) -> None:
        """Move the bar to ``state``."""
        self._state = state
        if self.task is None:
            return
        done = state.done + state.skipped
        self.progress.update(self.task, completed=done, total=state.total,
                             rate=_rate_per_minute(state, time.monotonic()),
                             status=_status_text(state))

    def message(self, text: str) -> None:
        """A line of its own above the bar."""
        self.progress.console.print(text, markup=False, highlight=False)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Show the final state and stop the bar."""
        if self.task is not None:
            self.status(self._state)
        self.progress.stop()


class LogReporter:
    """Plain periodic lines (for pipes, CI logs and cron mail); ``interval=None`` is quiet."""

    def __init__(self, *, stream: TextIO | None = None, interval: float | None = 10.0,
                 banner: str | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.banner = banner
        self._last = 0.0
        self._state: RunState | None = None

    def _emit(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{stamp} batchflux: {text}", file=self.stream, flush=True)

    def start(self, *, total: int | None, skipped: int, attached: int) -> None:
        """The banner, and the item count when progress lines are on."""
        self._last = time.monotonic()
        if self.banner:
            self._emit(self.banner)
        if self.interval is not None:
            self._emit(f"starting: {plural(total, 'item') if total is not None else '? items'}")

    def result(self, record: Result) -> None:
        """A failure gets a line of its own (when progress lines are on)."""
        if record.error is not None and self.interval is not None:
            self._emit(f"failed {item_label(record)}: {record.error.category.value}: "
                       f"{escape_controls(record.error.message)}")

    def status(self, state: RunState) -> None:
        """A progress line, at most one every ``interval`` seconds."""
        self._state = state
        now = time.monotonic()
        if self.interval is None or now - self._last < self.interval:
            return
        self._last = now
        total = state.total if state.total is not None else "?"
        eta = _eta_seconds(state, now)
        eta_text = f", ETA {eta:.0f} s" if eta is not None else ""
        self._emit(f"{state.done + state.skipped}/{total} done "
                   f"({_rate_per_minute(state, now):.0f} img/min{eta_text}); "
                   f"{_status_text(state)}")

    def message(self, text: str) -> None:
        """A line of its own."""
        self._emit(text)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Nothing: the run's closing line is :func:`summary_line`."""


class JsonReporter:
    """One JSON object a line on ``stream``: start, item, progress, message, finish events."""

    def __init__(self, *, stream: TextIO | None = None, interval: float = 10.0,
                 simulated: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.simulated = simulated
        self._last = 0.0

    def _emit(self, event: str, **fields: Any) -> None:
        record = {"ts": time.time(), "event": event, **fields}
        print(json.dumps(record, separators=(",", ":"), default=str), file=self.stream,
              flush=True)

    def start(self, *, total: int | None, skipped: int, attached: int) -> None:
        """A ``start`` event with the item count."""
        self._last = time.monotonic()
        self._emit("start", total=total, simulated=self.simulated)

    def result(self, record: Result) -> None:
        """One ``item`` event per finished item."""
        self._emit("item", key=record.key, status=record.status,
                   label=item_label(record), prompt_id=record.prompt_id,
                   seed=record.seed, job_id=record.job_id,
                   category=None if record.error is None else record.error.category.value,
                   files=[f.path for f in record.files])

    def status(self, state: RunState) -> None:
        """A ``progress`` event, at most one every ``interval`` seconds."""
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self._emit("progress", done=state.done, ok=state.ok, failed=state.failed,
                   skipped=state.skipped, total=state.total, inflight=state.inflight,
                   inflight_cap=state.inflight_cap,
                   cooldown_seconds=round(state.cooldown_remaining, 3))

    def message(self, text: str) -> None:
        """A ``message`` event."""
        self._emit("message", text=text)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """A ``finish`` event carrying the run's summary."""
        self._emit("finish", summary=summary)


def summary_line(summary: Mapping[str, Any], out_dir: Path, *, simulated: bool) -> str:
    """The one line every run ends with."""
    counts = summary.get("counts", {})
    parts = [f"{counts.get('ok', 0)} ok", f"{counts.get('failed', 0)} failed"]
    if counts.get("skipped"):
        parts.append(f"{counts['skipped']} already done")
    if counts.get("not_started"):
        parts.append(f"{counts['not_started']} not started")
    errors = summary.get("errors_by_category") or {}
    if errors:
        parts.append("(" + ", ".join(f"{k} {v}" for k, v in errors.items()) + ")")
    credits = summary.get("credits_spent", 0)
    head = "SIMULATED run" if simulated else "run"
    line = (f"batchflux: {head}: {', '.join(parts)} in {summary.get('elapsed_seconds', 0):.1f} s, "
            f"{plural(credits, 'credit')}. images: {out_dir / 'images'}  results: "
            f"{out_dir / 'results.jsonl'}  summary: {out_dir / 'summary.json'}")
    if summary.get("stop_reason"):
        line += f"  (stopped: {summary['stop_reason']})"
    return line
