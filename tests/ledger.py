"""The paid-job ledger: every job the simulator created, grouped by the item that asked for it.

batchflux's promise is "an item is paid for once": at most one paid (non-refunded) job per item,
unless its earlier job failed (refunded), expired, or was lost (the provider forgot it: here, a
simulator that was restarted). The simulator's own ``duplicate_jobs`` counter only sees
identical request bodies; this ledger groups jobs by item, whatever the bodies were, through
the item key inside batchflux's ``Idempotency-Key`` (``batchflux-<key[:48]>-<submission>``).

Collect from every simulator a test used (a restarted simulator is a new *era*: its
predecessor's jobs count as lost), then check::

    ledger = Ledger()
    ledger.collect(base_url)                 # or ledger.collect(app.state.sim)
    ledger.assert_holds(out_dirs=[out])
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

IDEMPOTENCY_KEY = re.compile(r"^batchflux-([0-9a-f]{48})-(\d+)$")


@dataclass(frozen=True, slots=True)
class LedgerJob:
    """One job as the simulator recorded it."""

    era: int
    id: str
    item: str | None  # the first 48 hex digits of the item key; None without our key
    submission: int | None
    status: str
    cost: int
    refunded: bool
    expired: bool
    created_at: str

    @property
    def paid(self) -> bool:
        return not self.refunded and self.cost > 0


class Ledger:
    """Jobs from one or more simulator eras, and the checks the promise implies."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[int, str], LedgerJob] = {}
        self._eras: dict[int, int] = {}  # id(source) -> era number
        self.era = 0

    # -- collecting ------------------------------------------------------------------------

    def new_era(self) -> None:
        """The simulator was restarted: what comes next is a new era (earlier jobs are lost)."""
        self.era += 1

    def collect(self, source: Any) -> list[LedgerJob]:
        """Read every job of ``source`` (a base URL, or a ``SimState``) into the current era.

        Collecting the same simulator again updates its jobs (statuses move on)."""
        if isinstance(source, str):
            raw = httpx.get(f"{source}/_sim/jobs", timeout=30).json()["jobs"]
        else:
            now = source.clock()
            source.settle(now)
            raw = source.ledger_json(now)
        jobs = []
        for entry in raw:
            match = IDEMPOTENCY_KEY.match(entry.get("idempotencyKey") or "")
            job = LedgerJob(
                era=self.era, id=entry["id"],
                item=match.group(1) if match else None,
                submission=int(match.group(2)) if match else None,
                status=entry["status"], cost=int(entry["cost"]),
                refunded=bool(entry["refunded"]), expired=bool(entry["expired"]),
                created_at=entry["createdAt"])
            self._jobs[(self.era, job.id)] = job
            jobs.append(job)
        return jobs

    # -- reading -----------------------------------------------------------------------------

    @property
    def jobs(self) -> list[LedgerJob]:
        return sorted(self._jobs.values(), key=lambda j: (j.era, j.created_at, j.id))

    def by_item(self) -> dict[str | None, list[LedgerJob]]:
        """Each item's jobs, oldest first (``None``: jobs created without our key)."""
        groups: dict[str | None, list[LedgerJob]] = defaultdict(list)
        for job in self.jobs:
            groups[job.item].append(job)
        return dict(groups)

    def paid_jobs(self) -> int:
        return sum(job.paid for job in self._jobs.values())

    # -- checking ----------------------------------------------------------------------------

    def violations(self, out_dirs: list[Path] = ()) -> list[str]:  # type: ignore[assignment]
        """Every way the ledger breaks the promise; empty when it holds.

        - a job without batchflux's Idempotency-Key (nobody can account for it);
        - an item with a second paid job while an earlier paid job of the same era had not
          expired (an earlier job that failed was refunded; one of an earlier era was lost);
        - with ``out_dirs``: a paid job whose item appears in no result line and no journal
          line of those run directories, and an ok result line whose job the simulator of
          that era does not show COMPLETED.
        """
        problems: list[str] = []
        for item, jobs in self.by_item().items():
            if item is None:
                problems.append(f"{len(jobs)} job(s) without a batchflux Idempotency-Key: "
                                f"{[j.id for j in jobs][:5]}")
                continue
            holder: LedgerJob | None = None
            for job in jobs:
                if not job.paid:
                    continue
                if holder is not None and holder.era == job.era and not holder.expired:
                    problems.append(
                        f"item {item[:12]} paid twice: job {holder.id} (submission "
                        f"{holder.submission}, {holder.status}) and job {job.id} (submission "
                        f"{job.submission}, {job.status})")
                holder = job
        if out_dirs:
            problems += self._unaccounted(list(out_dirs))
        return problems

    def _unaccounted(self, out_dirs: list[Path]) -> list[str]:
        mentioned: set[str] = set()
        ok_jobs: dict[str, str] = {}
        for out in out_dirs:
            for path in (out / "results.jsonl", out / ".batchflux" / "journal.jsonl"):
                for record in _records(path):
                    key = record.get("key")
                    if isinstance(key, str):
                        mentioned.add(key[:48])
                    if path.name == "results.jsonl" and record.get("status") == "ok" \
                            and record.get("job_id"):
                        ok_jobs[record["job_id"]] = record["key"]
        problems = []
        for job in self.jobs:
            if job.paid and job.item is not None and job.item not in mentioned:
                problems.append(f"paid job {job.id} (item {job.item[:12]}) is in no result "
                                "line and no journal line")
        latest = {job.id: job for job in self.jobs}
        for job_id, key in ok_jobs.items():
            job = latest.get(job_id)
            if job is not None and job.status != "COMPLETED":
                problems.append(f"ok result of {key[:12]} names job {job_id}, which is "
                                f"{job.status}")
        return problems

    def assert_holds(self, out_dirs: list[Path] = ()) -> None:  # type: ignore[assignment]
        problems = self.violations(out_dirs)
        assert not problems, "the paid-job ledger does not hold:\n  " + "\n  ".join(problems)


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
