"""``batchflux validate`` and ``batchflux plan``: look at a manifest without spending anything.

``validate`` loads each manifest and prints every diagnostic (``FILE:LINE:COL: field: message``)
to ``err``; exit 0 when all are valid, 65 otherwise. ``plan`` also prints what the manifest
expands to: the item count, the size of every axis, what the run directory already holds
(items done, failed, still to run: classified exactly as ``batchflux run`` classifies them,
reading the directory without creating it or taking its lock), a preview of the first items,
the credit cost of what is still to run, and warnings (duplicate requests, very large grids).
Memory stays flat for any grid size: items are streamed (8 bytes an item still to run, as in
a run), and the duplicate warnings cover the first :data:`DUPLICATE_CHECK_LIMIT` items.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .display import escape_controls, plural
from .errors import EXIT_DATAERR, EXIT_OK, ManifestError, UsageError
from .expand import axis_summaries, count_items, expand_job
from .manifest import load_job
from .models import DEFAULT_RUN_OPTIONS, Diagnostic, JobSpec, WorkItem
from .resume import scan_items, skip_reason
from .store import ResumeIndex

#: Items whose keys are checked for duplicates (a 64-bit key prefix each, so memory is bounded).
DUPLICATE_CHECK_LIMIT = 50_000
#: Grids above this many items get a "very large grid" warning.
LARGE_GRID = 10_000


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``plan`` reports about one manifest.

    ``items == done + failed + to_run_items``: ``done`` items are ok in the run directory,
    ``failed`` ones failed earlier and a run leaves them (``failed_retryable`` of them would
    run again with ``--retry-failed``), the rest are to run. ``to_run`` counts each distinct
    request once (items with identical requests are generated once), and ``estimated_cost``
    is what ``to_run`` costs: what the run checks against its budget.
    """

    path: str
    model: str
    items: int
    axes: dict[str, int]
    varying_axes: tuple[str, ...]
    cost_per_image: float
    estimated_cost: float
    preview: tuple[WorkItem, ...]
    warnings: tuple[str, ...]
    duplicates_checked: int
    duplicates: int
    done: int = 0
    failed: int = 0
    failed_retryable: int = 0
    to_run: int = 0
    to_run_items: int = 0
    reattach: int = 0  # items to run that have a journaled job (paid only if the API lost it)
    out_dir: str | None = None
    out_dir_exists: bool = False
    retry_failed: str | None = None
    rerolls: int | None = None  # with --reroll: the new images the rejected ones earn

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.path,
            "model": self.model,
            "items": self.items,
            "done": self.done,
            "failed": self.failed,
            "failed_retryable": self.failed_retryable,
            "to_run": self.to_run,
            "to_run_items": self.to_run_items,
            "reattach": self.reattach,
            "out_dir": self.out_dir,
            "out_dir_exists": self.out_dir_exists,
            "retry_failed": self.retry_failed,
            "rerolls": self.rerolls,
            "axes": self.axes,
            "varying_axes": list(self.varying_axes),
            "cost_per_image": self.cost_per_image,
            "estimated_cost": self.estimated_cost,
            "duplicates": {"checked": self.duplicates_checked, "found": self.duplicates},
            "warnings": list(self.warnings),
            "preview": [item_to_json(item) for item in self.preview],
        }


def item_to_json(item: WorkItem) -> dict[str, Any]:
    """A work item as plain JSON (as in ``plan --json``)."""
    return {
        "index": item.index,
        "key": item.key,
        "prompt_id": item.prompt_id,
        "prompt": item.prompt,
        "template": item.template,
        "vars": dict(item.vars),
        "model": item.model,
        "params": dict(item.params),
        "source": item.source,
        "meta": dict(item.meta),
    }


class _Tally:
    """One pass over the items: the preview, the duplicate warnings, and how the run
    directory classifies each item (the run's own :func:`~batchflux.resume.skip_reason`)."""

    def __init__(self, index: ResumeIndex, retry_failed: str | None, limit: int) -> None:
        self.index = index
        self.retry_failed = retry_failed
        self.limit = limit
        self.preview: list[WorkItem] = []
        self.warnings: list[str] = []
        self.seen: dict[int, int] = {}  # 64-bit key prefix -> index of its first item
        self.checked = self.duplicates = 0
        self.done = self.failed = self.failed_retryable = self.to_run_items = 0
        self.reattach = 0

    def items(self, items: Iterable[WorkItem]) -> Iterator[WorkItem]:
        """``items``, unchanged, each seen on its way through."""
        for item in items:
            self._see(item)
            yield item

    def _see(self, item: WorkItem) -> None:
        if len(self.preview) < self.limit:
            self.preview.append(item)
        if self.checked < DUPLICATE_CHECK_LIMIT:
            self.checked += 1
            first = self.seen.setdefault(int(item.key[:16], 16), item.index)
            if first != item.index:
                self.duplicates += 1
                if self.duplicates <= 5:
                    self.warnings.append(
                        f"duplicate request: item {item.index} ({item.prompt_id}, "
                        f"{item.source}) has the same key {item.key[:12]} as item {first}; "
                        "it is generated once")
        reason = skip_reason(self.index, item.key, self.retry_failed)
        if reason == "ok":
            self.done += 1
        elif reason == "failed":
            self.failed += 1
            prior = self.index.prior_failure(item.key)
            self.failed_retryable += bool(prior is not None and prior.retryable)
        else:
            self.to_run_items += 1
            if (self.index.journaled_job(item.key) is not None
                    or self.index.journaled_intent(item.key) is not None):
                self.reattach += 1


def make_plan(
    spec: JobSpec,
    *,
    limit: int = 10,
    cost_per_image: float | None = None,
    index: ResumeIndex | None = None,
    out_dir: str | None = None,
    out_dir_exists: bool = False,
    retry_failed: str | None = None,
    reroll: str | None = None,
) -> Plan:
    """Count, preview and check ``spec``, streaming its items (memory: 8 bytes an item still
    to run, as in a run).

    ``index`` is what the run directory ``out_dir`` holds (None: nothing yet); each item is
    classified as ``batchflux run --retry-failed=retry_failed`` would classify it, and the
    items still to run are counted as the run counts them (:func:`batchflux.resume.scan_items`).
    """
    total = count_items(spec)
    summaries = axis_summaries(spec)
    price = (cost_per_image if cost_per_image is not None
             else spec.options.cost_per_image if spec.options.cost_per_image is not None
             else DEFAULT_RUN_OPTIONS.cost_per_image or 0.0)
    index = index if index is not None else ResumeIndex()
    tally = _Tally(index, retry_failed, limit)
    items: Iterable[WorkItem] = expand_job(spec)
    rerolls = 0
    if reroll is not None and out_dir is not None:
        from .reroll import reroll_items

        extra = list(reroll_items(expand_job(spec), out_dir, image_hashes=spec.image_hashes,
                                  first_index=total))
        rerolls = sum(1 for item in extra if skip_reason(index, item.key, retry_failed) is None)
        items = itertools.chain(items, extra)
        total += len(extra)
    scan = scan_items(tally.items(items), index, retry_failed=retry_failed)
    warnings = [str(w) for w in spec.warnings] + tally.warnings
    if tally.duplicates > 5:
        warnings.append(f"... {tally.duplicates - 5} more duplicate requests")
    if tally.checked < total:
        warnings.append(f"duplicate check covered the first {tally.checked:,} of "
                        f"{plural(total, 'item')}")
    if total > LARGE_GRID:
        warnings.append(f"very large grid: {plural(total, 'item')}, about "
                        f"{plural(round(total * price), 'credit')}")
    cost = scan.to_run * price
    if spec.options.budget is not None and cost > spec.options.budget:
        warnings.append(f"the estimate ({plural(round(cost), 'credit')}) is over run.budget "
                        f"({spec.options.budget:,.0f}); the run will stop at the budget")
    for bad in index.bad_lines[:5]:
        warnings.append(f"run directory: {bad}")
    if len(index.bad_lines) > 5:
        warnings.append(f"run directory: ... {len(index.bad_lines) - 5} more damaged lines")
    return Plan(
        path=str(spec.path),
        model=spec.model,
        items=total,
        axes={s.name: s.size for s in summaries},
        varying_axes=tuple(s.name for s in summaries if s.varies),
        cost_per_image=float(price),
        estimated_cost=float(cost),
        preview=tuple(tally.preview),
        warnings=tuple(warnings),
        duplicates_checked=tally.checked,
        duplicates=tally.duplicates,
        done=tally.done,
        failed=tally.failed,
        failed_retryable=tally.failed_retryable,
        to_run=scan.to_run,
        to_run_items=tally.to_run_items,
        reattach=tally.reattach,
        out_dir=out_dir,
        rerolls=rerolls if reroll is not None else None,
        out_dir_exists=out_dir_exists,
        retry_failed=retry_failed,
    )


def load_run_directory(out_dir: str | Path) -> ResumeIndex | None:
    """What the run directory ``out_dir`` holds, read only: nothing is created, no lock is
    taken (a run may be writing it). None when there is no such directory."""
    path = Path(out_dir)
    if not path.exists():
        return None
    if not path.is_dir():
        raise UsageError(f"{out_dir} is not a directory (give the run directory with --out)")
    try:
        return ResumeIndex.load(path)
    except OSError as exc:
        raise UsageError(f"cannot read the run directory {out_dir}: "
                         f"{exc.strerror or exc}") from exc


def _print_diagnostics(diagnostics: Iterable[Diagnostic], err: TextIO) -> None:
    for diagnostic in diagnostics:
        print(escape_controls(str(diagnostic)), file=err)


def validate_command(paths: Sequence[str], *, out: TextIO, err: TextIO) -> int:
    """Validate every manifest; diagnostics to ``err``; 0 if all are valid, else 65."""
    status = EXIT_OK
    for path in paths:
        try:
            spec = load_job(path)
        except ManifestError as exc:
            _print_diagnostics(exc.diagnostics, err)
            status = EXIT_DATAERR
            continue
        print(f"{path}: ok ({plural(count_items(spec), 'item')})", file=out)
    return status


def plan_command(
    path: str,
    *,
    as_json: bool,
    limit: int,
    max_items: int | None,
    cost_per_image: float | None,
    out: TextIO,
    err: TextIO,
    out_dir: str | None = None,
    retry_failed: str | None = None,
    reroll: str | None = None,
) -> int:
    """Print the plan of one manifest (text or one JSON object); 65 if it is invalid.

    ``out_dir`` is the run directory to compare with (default: the manifest's
    ``run.out_dir``, else ``out``, as for ``batchflux run``); ``retry_failed`` as for run.
    """
    try:
        spec = load_job(path, max_items=max_items)
    except ManifestError as exc:
        _print_diagnostics(exc.diagnostics, err)
        return EXIT_DATAERR
    directory = str(out_dir or spec.options.out_dir or DEFAULT_RUN_OPTIONS.out_dir or "out")
    index = load_run_directory(directory)
    plan = make_plan(spec, limit=max(limit, 0), cost_per_image=cost_per_image, index=index,
                     out_dir=directory, out_dir_exists=index is not None,
                     retry_failed=retry_failed, reroll=reroll)
    if as_json:
        print(json.dumps(plan.to_json(), ensure_ascii=False), file=out)
        return EXIT_OK
    _print_text(plan, out)
    return EXIT_OK


def _print_text(plan: Plan, out: TextIO) -> None:
    """The plan for people. Every line passes through :func:`escape_controls`: a prompt with
    U+202E (right-to-left override), an escape sequence or a newline is shown escaped
    (``\\u202e``), never obeyed by the terminal. ``--json`` keeps the exact text."""
    for line in _text_lines(plan):
        print(escape_controls(line), file=out)


def _text_lines(plan: Plan) -> Iterator[str]:
    yield f"{plan.path}: {plural(plan.items, 'item')}, model {plan.model}"
    axes = " x ".join(
        f"{name} {size}{'*' if name in plan.varying_axes else ''}"
        for name, size in plan.axes.items()
    )
    yield f"axes: {axes}"
    if plan.varying_axes:
        yield "  (* differs between prompts; the largest size is shown)"
    yield from _progress_lines(plan)
    if plan.rerolls is not None:
        yield (f"reroll rejected: {plural(plan.rerolls, 'new image')} for the rejected ones, "
               f"{plan.rerolls * plan.cost_per_image:,.2f} credits (counted in the cost below)")
    yield (f"estimated cost: {plan.estimated_cost:,.2f} credits for "
           f"{plural(plan.to_run, 'item')} to run ({plan.cost_per_image:g} per image)")
    if plan.preview:
        yield f"first {plural(len(plan.preview), 'item')}:"
        for item in plan.preview:
            params = " ".join(f"{k}={_short(v)}" for k, v in item.params.items()
                              if k not in ("seed",))
            yield f"  #{item.index} {item.prompt_id} {item.key[:12]} seed={item.seed} {params}"
            yield f"      {_short(item.prompt, 100)}"
            if item.meta:
                yield "      meta: " + " ".join(f"{k}={_short(v)}" for k, v in item.meta.items())
    for warning in plan.warnings:
        yield f"warning: {warning}"


def _progress_lines(plan: Plan) -> Iterator[str]:
    """What the run directory holds, and what a run would do."""
    if not plan.out_dir_exists:
        yield f"run directory {plan.out_dir}: none yet, every item is to run"
        return
    failed = f"{plan.failed:,} failed"
    if plan.failed:
        if plan.retry_failed is None and plan.failed_retryable:
            them = "it" if plan.failed_retryable == 1 else "them"
            failed += (f" ({plan.failed_retryable:,} retryable: add --retry-failed to run "
                       f"{them} again)")
        elif plan.retry_failed is None:
            failed += " (none retryable: --retry-failed=all runs them again)"
        else:
            failed += " (not retryable: --retry-failed=all runs them again)"
    to_run = f"{plan.to_run_items:,} to run"
    if plan.to_run != plan.to_run_items:
        to_run += (f" as {plural(plan.to_run, 'request')} (items with identical requests "
                   "are generated once)")
    yield f"run directory {plan.out_dir}: {plan.done:,} done, {failed}, {to_run}"
    if plan.reattach:
        yield (f"  {plural(plan.reattach, 'item')} to run already have a journaled job: "
               "re-attached, paid again only if the API no longer has it")


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."
