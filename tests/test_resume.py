"""What runs next: the one rule by which `run` and `plan` classify items against the run
directory (batchflux.resume)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from batchflux.models import ErrorCategory, ErrorInfo, Result, WorkItem
from batchflux.resume import scan_items, skip_reason
from batchflux.store import RESULTS_NAME, ResumeIndex


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def line(name: str, *, category: ErrorCategory | None = None) -> str:
    error = None if category is None else ErrorInfo(category, "it failed", category.retryable)
    result = Result(key=key(name), index=0, prompt_id=name, status="ok" if error is None
                    else "failed", model="flux-2-dev", prompt=name, seed=1,
                    params={"aspect_ratio": "1:1", "seed": 1}, error=error)
    return json.dumps(result.to_json(), separators=(",", ":")) + "\n"


@pytest.fixture
def index(tmp_path: Path) -> ResumeIndex:
    (tmp_path / RESULTS_NAME).write_text(
        line("done") + line("flaky", category=ErrorCategory.SERVER_ERROR)
        + line("refused", category=ErrorCategory.INVALID_REQUEST))
    return ResumeIndex.load(tmp_path, check_files=False)  # the lines name no real files


@pytest.mark.parametrize(("retry_failed", "expected"), [
    (None, {"done": "ok", "flaky": "failed", "refused": "failed", "new": None}),
    ("retryable", {"done": "ok", "flaky": None, "refused": "failed", "new": None}),
    ("all", {"done": "ok", "flaky": None, "refused": None, "new": None}),
])
def test_an_item_is_skipped_when_done_or_a_failure_not_retried(
        index: ResumeIndex, retry_failed: str | None, expected: dict[str, str | None]) -> None:
    assert {name: skip_reason(index, key(name), retry_failed) for name in expected} == expected


def item(n: int, name: str) -> WorkItem:
    return WorkItem(index=n, key=key(name), prompt_id=name, prompt=name,
                    params={"aspect_ratio": "1:1", "seed": 1})


def test_the_scan_counts_each_distinct_request_still_to_run_once(index: ResumeIndex) -> None:
    items = [item(0, "done"), item(1, "flaky"), item(2, "new"), item(3, "new"),
             item(4, "other")]
    scan = scan_items(items, index, retry_failed="retryable")
    assert scan.total == 5
    assert scan.to_run == 3  # flaky, new (twice: one request), other
    assert scan.duplicates == frozenset({int(key("new")[:16], 16)})
    assert scan_items(items, index).to_run == 2  # flaky's failure is left alone
