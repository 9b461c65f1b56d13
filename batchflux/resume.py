"""What runs next: how the items of a manifest are classified against what the run directory
already holds (its :class:`~batchflux.store.ResumeIndex`).

One rule for ``batchflux run`` and ``batchflux plan``, so that the plan counts items done,
failed and still to run exactly as the following run treats them, and its cost estimate is
what that run spends:

- :func:`skip_reason`: an item ok earlier is done; an earlier failure is left alone unless
  ``--retry-failed`` retries it; everything else runs (new items, retried failures, ok items
  whose images are gone).
- :func:`scan_items`: one pass over the items before anything is spent, in bounded memory:
  how many there are, how many distinct requests are still to run, which keys repeat (and,
  for a run, the key ids of all of them).

>>> index = ResumeIndex()                     # an empty run directory
>>> skip_reason(index, "ab" * 32, None) is None
True
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

from .models import WorkItem
from .store import ResumeIndex, key_id

__all__ = ["Scan", "scan_items", "skip_reason"]


def skip_reason(index: ResumeIndex, key: str, retry_failed: str | None) -> str | None:
    """Why an item is not run again: ``"ok"`` (done), ``"failed"`` (an earlier failure that
    ``retry_failed`` does not retry: None retries none, ``"retryable"`` those whose error was
    retryable, ``"all"`` every one), or None (run it: new, retried, or images to fetch)."""
    if index.is_ok(key):
        return "ok"
    prior = index.prior_failure(key)
    if prior is not None and (retry_failed is None or (
            retry_failed == "retryable" and not prior.retryable)):
        return "failed"
    return None


@dataclass(frozen=True, slots=True)
class Scan:
    """One pass over a run's items before anything is spent: how many there are, how many
    are still to run (each distinct request once), which keys repeat, and (when asked for)
    the key ids of all of them (sorted, distinct: what "the items of the current manifest"
    are, :meth:`batchflux.store.RunStore.write_item_keys`)."""

    total: int
    to_run: int
    duplicates: frozenset[int]  # key ids that more than one item still to run has
    keys: array = field(default_factory=lambda: array("Q"))  # type: ignore[type-arg]


def scan_items(items: Iterable[WorkItem], index: ResumeIndex, *,
               retry_failed: str | None = None, keys: bool = False) -> Scan:
    """Count the items and find repeated keys in bounded memory (8 bytes an item to run;
    with ``keys``, 8 more an item for the key ids of all of them)."""
    total = 0
    pending = array("Q")
    every = array("Q")
    for item in items:
        total += 1
        kid = key_id(item.key)
        if keys:
            every.append(kid)
        if skip_reason(index, item.key, retry_failed) is None:
            pending.append(kid)
    ordered = array("Q", sorted(pending))
    repeated = {a for a, b in pairwise(ordered) if a == b}
    distinct = len(ordered) - sum(1 for a, b in pairwise(ordered) if a == b)
    return Scan(total=total, to_run=distinct, duplicates=frozenset(repeated),
                keys=_distinct_sorted(every))


def _distinct_sorted(values: array) -> array:  # type: ignore[type-arg]
    out = array("Q")
    previous = None
    for value in sorted(values):
        if value != previous:
            out.append(value)
            previous = value
    return out
