"""Shared pieces of the chaos suite: fault profiles, the run-directory audit, a figures log."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner_helpers import check_run_directory

from batchflux.sim import SimSettings

#: Every profile starts from this: short jobs, flat images, plenty of credits, a fixed seed.
BASE = SimSettings(job_seconds=(0.15, 0.45), queue_seconds=0.05, render_mode="fast",
                   credits=100_000, fault_seed=11)

#: Set BATCHFLUX_CHAOS_FIGURES=FILE to append one JSON line of figures per profile run
#: (docs/reliability.md quotes them).
FIGURES_ENV = "BATCHFLUX_CHAOS_FIGURES"


@dataclass(frozen=True, slots=True)
class Profile:
    """One repeatable fault profile: simulator settings, the API target's own settings
    (keyword arguments of :class:`batchflux.config.Api`, e.g. ``timeouts``) and what the run
    must end with."""

    name: str
    sim: dict[str, Any]
    expect_ok_only: bool = True
    target: dict[str, Any] = field(default_factory=dict)
    check: Callable[..., None] | None = None


def audit(out: Path, *, expected_items: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The disk invariants (runner_helpers.check_run_directory) plus a summary that adds up."""
    records = check_run_directory(out, expected_items=expected_items)
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["ok"] + counts["failed"] + counts["skipped"] == summary["total_items"], counts
    assert counts["not_started"] == 0, counts
    by_category: dict[str, int] = {}
    for record in records:
        if record["status"] == "failed":
            category = record["error"]["category"]
            by_category[category] = by_category.get(category, 0) + 1
    if counts["skipped"] == 0:  # one run did everything: its figures are the directory's
        assert counts["ok"] == sum(r["status"] == "ok" for r in records), counts
        assert summary["errors_by_category"] == by_category, (summary, by_category)
    return records, summary


def log_figures(name: str, *, items: int, records: list[dict[str, Any]],
                stats: dict[str, Any]) -> None:
    target = os.environ.get(FIGURES_ENV)
    if not target:
        return
    line = {
        "profile": name,
        "items": items,
        "ok": sum(r["status"] == "ok" for r in records),
        "failed": sum(r["status"] == "failed" for r in records),
        "lost": items - len(records),
        "faults_injected": dict(sorted(stats["errors_injected"].items())),
        "rate_limited": stats["rate_limited"],
        "jobs_created": stats["jobs_created"],
        "idempotent_replays": stats["idempotent_replays"],
        "duplicate_jobs": stats["duplicate_jobs"],
    }
    with open(target, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
