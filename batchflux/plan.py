"""``batchflux validate`` and ``batchflux plan``: look at a manifest without spending anything.

``validate`` loads each manifest and prints every diagnostic (``FILE:LINE:COL: field: message``)
to ``err``; exit 0 when all are valid, 65 otherwise. ``plan`` also prints what the manifest
expands to: the item count (by arithmetic), the size of every axis, a preview of the first
items, the estimated credit cost and warnings (duplicate requests, very large grids).
Memory stays flat for any grid size: items are streamed, and the exact duplicate check
covers the first :data:`DUPLICATE_CHECK_LIMIT` items (beyond that ``plan`` says so).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .display import escape_controls
from .errors import EXIT_DATAERR, EXIT_OK, Diagnostic, ManifestError
from .expand import axis_summaries, count_items, expand_job
from .manifest import JobSpec, load_job
from .models import DEFAULT_RUN_OPTIONS, WorkItem

#: Items whose keys are checked for duplicates (a 64-bit key prefix each, so memory is bounded).
DUPLICATE_CHECK_LIMIT = 50_000
#: Grids above this many items get a "very large grid" warning.
LARGE_GRID = 10_000


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``plan`` reports about one manifest."""

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

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.path,
            "model": self.model,
            "items": self.items,
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
    }


def make_plan(
    spec: JobSpec, *, limit: int = 10, cost_per_image: float | None = None
) -> Plan:
    """Count, preview and check ``spec`` in bounded memory."""
    total = count_items(spec)
    summaries = axis_summaries(spec)
    price = (cost_per_image if cost_per_image is not None
             else spec.options.cost_per_image if spec.options.cost_per_image is not None
             else DEFAULT_RUN_OPTIONS.cost_per_image or 0.0)
    warnings = [str(w) for w in spec.warnings]
    preview: list[WorkItem] = []
    seen: dict[int, int] = {}  # 64-bit key prefix -> index of its first item
    duplicates = 0
    checked = 0
    for item in itertools.islice(expand_job(spec), max(limit, DUPLICATE_CHECK_LIMIT)):
        if len(preview) < limit:
            preview.append(item)
        if checked < DUPLICATE_CHECK_LIMIT:
            checked += 1
            first = seen.setdefault(int(item.key[:16], 16), item.index)
            if first != item.index:
                duplicates += 1
                if duplicates <= 5:
                    warnings.append(
                        f"duplicate request: item {item.index} ({item.prompt_id}, "
                        f"{item.source}) has the same key {item.key[:12]} as item {first}; "
                        "it is generated once")
    if duplicates > 5:
        warnings.append(f"... {duplicates - 5} more duplicate requests")
    if checked < total:
        warnings.append(f"duplicate check covered the first {checked:,} of {total:,} items")
    if total > LARGE_GRID:
        warnings.append(f"very large grid: {total:,} items, about {total * price:,.0f} credits")
    if spec.options.budget is not None and total * price > spec.options.budget:
        warnings.append(f"the estimate ({total * price:,.0f} credits) is over run.budget "
                        f"({spec.options.budget:,.0f}); the run will stop at the budget")
    return Plan(
        path=str(spec.path),
        model=spec.model,
        items=total,
        axes={s.name: s.size for s in summaries},
        varying_axes=tuple(s.name for s in summaries if s.varies),
        cost_per_image=float(price),
        estimated_cost=float(total * price),
        preview=tuple(preview),
        warnings=tuple(warnings),
        duplicates_checked=checked,
        duplicates=duplicates,
    )


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
        print(f"{path}: ok ({count_items(spec):,} items)", file=out)
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
) -> int:
    """Print the plan of one manifest (text or one JSON object); 65 if it is invalid."""
    try:
        spec = load_job(path, max_items=max_items)
    except ManifestError as exc:
        _print_diagnostics(exc.diagnostics, err)
        return EXIT_DATAERR
    plan = make_plan(spec, limit=max(limit, 0), cost_per_image=cost_per_image)
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
    yield f"{plan.path}: {plan.items:,} items, model {plan.model}"
    axes = " x ".join(
        f"{name} {size}{'*' if name in plan.varying_axes else ''}"
        for name, size in plan.axes.items()
    )
    yield f"axes: {axes}"
    if plan.varying_axes:
        yield "  (* differs between prompts; the largest size is shown)"
    yield (f"estimated cost: {plan.estimated_cost:,.2f} credits "
           f"({plan.cost_per_image:g} per image)")
    if plan.preview:
        yield f"first {len(plan.preview)} items:"
        for item in plan.preview:
            params = " ".join(f"{k}={_short(v)}" for k, v in item.params.items()
                              if k not in ("seed",))
            yield f"  #{item.index} {item.prompt_id} {item.key[:12]} seed={item.seed} {params}"
            yield f"      {_short(item.prompt, 100)}"
    for warning in plan.warnings:
        yield f"warning: {warning}"


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."
