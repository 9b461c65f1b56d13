"""Summaries of result lines: the one tally that a run, ``merge`` and ``report`` share.

A :class:`Tally` takes :class:`~batchflux.models.Result` records one at a time and keeps
only counters and a bounded list of latencies, so a run of a million items tallies in flat
memory. :meth:`Tally.to_json` is the part of ``summary.json`` (and of ``report --json``) that
depends on the records alone; a run adds what only it knows (requests, limits, timings).

>>> from batchflux import read_results
>>> tally = Tally()
>>> for result in read_results("out/nightly").ordered():
...     tally.add(result)
>>> tally.to_json()["counts"]
{...'ok': 12...}
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .models import Result
from .stats import percentile, rounded

__all__ = ["Tally"]


@dataclass
class Tally:
    """Counts of a set of result lines.

    ``credits`` counts what the run paid: a duplicate line (the same job as an earlier item's)
    and a replayed job (created by another run) add nothing; ``replayed`` counts the latter.
    """

    by_status: Counter[str] = field(default_factory=Counter)
    by_category: Counter[str] = field(default_factory=Counter)
    credits: float = 0.0
    replayed: int = 0
    duplicates: int = 0
    images: int = 0
    bytes: int = 0
    latencies: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    #: Seconds from submit to the job's end of each counted ok line that has them (``report``
    #: shows their percentiles; not part of :meth:`to_json`).
    generating: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]

    def add(self, result: Result) -> None:
        """Count one result line."""
        self.by_status[result.status] += 1
        if result.error is not None:
            self.by_category[result.error.category.value] += 1
        if result.duplicate_of is not None:
            self.duplicates += 1
            return
        if result.ok:
            self.latencies.append(result.timings.total or 0.0)
            if result.timings.generating is not None:
                self.generating.append(result.timings.generating)
            self.images += len(result.files)
            self.bytes += sum(f.bytes for f in result.files)
        if result.replayed:
            self.replayed += 1
        else:
            self.credits += result.credit_cost or 0

    @property
    def ok(self) -> int:
        """Lines with status ok."""
        return self.by_status.get("ok", 0)

    @property
    def failed(self) -> int:
        """Lines with status failed."""
        return self.by_status.get("failed", 0)

    def to_json(self) -> dict[str, Any]:
        """The record-derived part of a summary."""
        return {
            "counts": {"ok": self.ok, "failed": self.failed},
            "errors_by_category": dict(sorted(self.by_category.items())),
            "credits_spent": self.credits,
            "replayed_jobs": self.replayed,
            "images": self.images,
            "bytes": self.bytes,
            "latency_seconds": {"p50": rounded(percentile(self.latencies, 0.5)),
                                "p95": rounded(percentile(self.latencies, 0.95))},
        }
