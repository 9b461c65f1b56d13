"""``batchflux report OUT``: what a run did, as a terminal table, JSON, or a static HTML page.

- :func:`build_report` reads a run directory (``results.jsonl``, ``summary.json`` and the
  review decisions in ``review.jsonl``) into one JSON-able dict: counts by status and error
  category (with the category's one-line explanation), credits, p50/p95 latencies, throughput,
  retries, the in-flight cap over time, and the images accepted, rejected, starred and still
  undecided. The counts come from the result lines through :class:`~batchflux.summary.Tally`,
  the tally the run itself and ``merge`` use, so it works on merged directories too.
  Only the items of the current manifest count (:func:`~batchflux.results.split_by_manifest`;
  the others are counted as ``not_in_manifest``) unless ``include_all`` (``--all``).
- :func:`render_table` prints that dict with rich.
- :func:`write_review` writes ``OUT/review/index.html`` (``report --html``): a contact sheet of
  thumbnails grouped by prompt and grid views (prompt rows x seed columns, prompt rows x
  aspect columns: the X/Y plot of image tools), one view at a time by URL fragment
  (``#sheet``, ``#grid-seed``, ``#grid-aspect``; CSS ``:target``, no script needed). Each
  group's header shows its prompt and the params all its items share, once; each image shows
  only what varies (seed, aspect ratio, size, any other param that differs); failures show
  their reason. Columns fill the window (CSS grid, ``auto-fill``). The page is
  self-contained: one HTML file with inline CSS, relative links to ``review/thumbs/*.jpg`` and
  to the full images, nothing external, so it works offline from the output directory, copied
  or zipped as a whole. Every piece of user text (prompts, ids, error messages) is
  HTML-escaped. With ``include_all``, results not in the manifest are shown, each marked
  "not in the manifest".

The grouping, labels and thumbnails are :mod:`batchflux.review`'s, shared with the review app
(``batchflux review``, :mod:`batchflux.reviewapp`).

>>> report = build_report("out/nightly")
>>> report["by_status"], report["credits_spent"]
({'ok': 12}, 24.0)
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from .fileutil import write_text_atomic
from .models import ErrorCategory, FileRecord, Result
from .results import ManifestSplit, recorded_path, split_by_manifest
from .review import (
    DEFAULT_THUMB_SIZE,
    NOT_IN_MANIFEST,
    REVIEW_DIR,
    THUMB_DIR,
    PromptGroup,
    axis_value,
    axis_values,
    format_value,
    image_label,
    make_thumbnail,
    manifest_note,
    prompt_groups,
    thumb_name,
    thumb_path,
    varying_params,
)
from .reviewapp.decisions import count_states, read_decisions
from .stats import percentile, rounded
from .store import SUMMARY_NAME, BadLine
from .summary import Tally

__all__ = [
    "ReviewPage",
    "build_report",
    "cap_timeline",
    "render_html",
    "render_table",
    "write_review",
]


# --------------------------------------------------------------------------------------------
# Numbers


def _explain(category: str) -> str:
    try:
        return ErrorCategory(category).explanation
    except ValueError:
        return "unknown category"


def _summary(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def build_report(out_dir: str | os.PathLike[str], *, include_all: bool = False,
                 split: ManifestSplit | None = None) -> dict[str, Any]:
    """Everything ``batchflux report`` shows, as one JSON-able dict.

    Counts, credits, images, bytes and latencies are those of a
    :class:`~batchflux.summary.Tally` of the final result of each item of the current
    manifest (every item with ``include_all``): ``credits_spent`` is what was paid (a
    duplicate item's line and a job replayed from another run add nothing), ``images`` the
    distinct images stored. ``not_in_manifest`` counts the items with a result that the
    manifest no longer has (left out unless ``include_all``; ``all`` says which). ``bad_lines``
    lists the lines of results.jsonl that could not be read (``file``, ``line``, ``reason``);
    every other line counts. ``split`` is the directory already read (else it is read here).

    >>> from batchflux import build_report
    >>> report = build_report("out/nightly")
    >>> report["items"], report["by_status"], report["credits_spent"]
    (12, {'ok': 12}, 24.0)
    """
    out = Path(out_dir)
    split = split or split_by_manifest(out)
    results = split.results
    records = split.records(include_all=include_all)
    summary = _summary(out)
    tally = Tally()
    for record in records:
        tally.add(record)
    counted = tally.to_json()
    cap = summary.get("inflight_cap") or {}
    decisions = count_states((r.key for r in records if r.ok and r.files), read_decisions(out))
    return {
        "out_dir": str(out),
        "items": len(records),
        "not_in_manifest": split.not_in_manifest,
        "all": include_all,
        "by_status": dict(sorted(tally.by_status.items())),
        "by_category": [
            {"category": name, "count": count, "explanation": _explain(name)}
            for name, count in sorted(tally.by_category.items())
        ],
        "credits_spent": counted["credits_spent"],
        "images": counted["images"],
        "bytes": counted["bytes"],
        "latency_seconds": counted["latency_seconds"],
        "generating_seconds": {"p50": rounded(percentile(tally.generating, 0.5)),
                               "p95": rounded(percentile(tally.generating, 0.95))},
        "throughput": summary.get("throughput"),
        "elapsed_seconds": summary.get("elapsed_seconds"),
        "retries": summary.get("retries"),
        "resubmissions": summary.get("resubmissions"),
        "jobs": sum(r.jobs for r in records),
        "polls": sum(r.polls for r in records),
        "last_run": summary.get("counts"),
        "inflight_cap": {"max": cap.get("max"), "final": cap.get("final"),
                         "history": cap.get("history") or []},
        "stop_reason": summary.get("stop_reason"),
        "shard": summary.get("shard"),
        "bad_lines": [bad.to_json() for bad in results.bad_lines],
        "decisions": decisions,
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}{unit}"
    return f"{value}{unit}"


def cap_timeline(history: Sequence[Sequence[float]], *, limit: int = 12) -> str:
    """The in-flight cap over time as text: ``16 @0s -> 8 @12.5s -> 9 @20.1s``."""
    if not history:
        return "-"
    steps = [f"{int(n)} @{float(t):g}s" for t, n in history]
    if len(steps) > limit:
        steps = [*steps[: limit // 2], f"... {len(steps) - limit} more ...",
                 *steps[-limit // 2:]]
    return " -> ".join(steps)


def render_table(report: Mapping[str, Any], *, console: Console | None = None) -> None:
    """Print ``report`` (from :func:`build_report`) as terminal tables."""
    console = console or Console()
    table = Table(title=f"batchflux run: {report['out_dir']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    statuses = report["by_status"]
    table.add_row("items", ", ".join(f"{v} {k}" for k, v in statuses.items()) or "none")
    table.add_row("images", f"{report['images']} ({report['bytes']:,} bytes)")
    table.add_row("credits spent", _fmt(report["credits_spent"]))
    lat = report["latency_seconds"]
    table.add_row("latency p50 / p95", f"{_fmt(lat['p50'], ' s')} / {_fmt(lat['p95'], ' s')}")
    gen = report["generating_seconds"]
    table.add_row("generating p50 / p95", f"{_fmt(gen['p50'], ' s')} / {_fmt(gen['p95'], ' s')}")
    throughput = report.get("throughput") or {}
    table.add_row("throughput (last run)",
                  f"{_fmt(throughput.get('images_per_minute'))} images/min, "
                  f"{_fmt(throughput.get('items_per_minute'))} items/min")
    table.add_row("jobs / polls", f"{report['jobs']} / {report['polls']}")
    table.add_row("retries / new jobs after FAILED",
                  f"{_fmt(report['retries'])} / {_fmt(report['resubmissions'])}")
    cap = report["inflight_cap"]
    table.add_row("in-flight cap", f"max {_fmt(cap['max'])}, final {_fmt(cap['final'])}: "
                  f"{cap_timeline(cap['history'])}")
    decisions = report.get("decisions") or {}
    if any(decisions.get(state) for state in ("accepted", "rejected", "starred")):
        table.add_row("review decisions", ", ".join(f"{v} {k}" for k, v in decisions.items()))
    last = report.get("last_run") or {}
    if last:
        table.add_row("last run", ", ".join(f"{k} {v}" for k, v in last.items()))
    if report.get("shard"):
        table.add_row("shard", str(report["shard"]))
    if report.get("stop_reason"):
        table.add_row("stopped", str(report["stop_reason"]))
    console.print(table)
    if report.get("not_in_manifest"):
        console.print(manifest_note(report["not_in_manifest"], include_all=report["all"]))
    if report["by_category"]:
        errors = Table(title="failures by category")
        errors.add_column("category", style="red")
        errors.add_column("items", justify="right")
        errors.add_column("what it means")
        for row in report["by_category"]:
            errors.add_row(row["category"], str(row["count"]), row["explanation"])
        console.print(errors)


# --------------------------------------------------------------------------------------------
# The HTML review page


@dataclass(frozen=True, slots=True)
class ReviewPage:
    """Where :func:`write_review` wrote the page, and what it holds."""

    path: Path
    thumbnails: int
    failures: int
    bad_lines: tuple[BadLine, ...] = ()  # results.jsonl lines skipped


@dataclass(frozen=True, slots=True)
class _Tile:
    record: Result
    file: FileRecord | None
    thumb: str | None  # relative to review/
    image: str | None  # relative to review/


def _tiles(out: Path, records: Iterable[Result], size: int) -> dict[str, list[_Tile]]:
    """Each record's tiles (one per image, or one failure tile), by key."""
    tiles: dict[str, list[_Tile]] = {}
    for record in records:
        if not record.ok or not record.files:
            tiles[record.key] = [_Tile(record, None, None, None)]
            continue
        mine = tiles[record.key] = []
        for number, f in enumerate(record.files, start=1):
            thumb: str | None = f"{THUMB_DIR}/{thumb_name(record.key, number)}"
            source = recorded_path(out, f.path)
            try:
                if source is None:  # a line pointing outside images/ is not followed
                    raise FileNotFoundError(f.path)
                make_thumbnail(source, thumb_path(out, record.key, number), size=size)
            except OSError:
                thumb = None  # a missing or unreadable image: shown as such, not fatal
            mine.append(_Tile(record, f, thumb, f"../{f.path}"))
    return tiles


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _url(rel: str) -> str:
    return quote(rel, safe="/.")


def _reason(record: Result) -> str:
    """Why an item shows no image: its error, or the image gone from the disk."""
    if record.ok:
        return "image missing on disk"
    if record.error is None:
        return "missing image: "
    return f"{record.error.category.value}: {record.error.message}"


def _figure(tile: _Tile, group: PromptGroup, stale: Collection[str]) -> str:
    record = tile.record
    varying = "".join(f"<li><span>{_e(k)}</span> {_e(format_value(v))}</li>"
                      for k, v in varying_params(record, group))
    old = record.key in stale
    caption = (f"<figcaption><b>{_e(image_label(record, tile.file))}</b>"
               + (f"<span class=stale-note>{_e(NOT_IN_MANIFEST)}</span>" if old else "")
               + (f"<ul class=params>{varying}</ul>" if varying else "")
               + f"<code>{_e(record.key[:12])}</code></figcaption>")
    classes = " ".join(c for c, on in (("failed", tile.thumb is None), ("stale", old)) if on)
    attrs = (f" class=\"{classes}\"" if classes else "") + f" data-key={_e(record.key)}"
    if tile.thumb is None:
        return (f"<figure{attrs}>"
                f"<div class=reason>failed<br>{_e(_reason(record))}</div>{caption}</figure>")
    title = _e(record.prompt)
    return (f"<figure{attrs}><a href=\"{_e(_url(tile.image or ''))}\">"
            f"<img src=\"{_e(_url(tile.thumb))}\" alt=\"{title}\" loading=eager></a>"
            f"{caption}</figure>")


def _group_head(group: PromptGroup, tag: str) -> str:
    common = "".join(f"<li><span>{_e(k)}</span> {_e(format_value(v))}</li>"
                     for k, v in group.common)
    return (f"<{tag} class=group-head><b class=prompt-id>{_e(group.prompt_id)}</b> "
            f"<span class=prompt-text>{_e(group.prompt)}</span>"
            + (f"<ul class=common>{common}</ul>" if common else "") + f"</{tag}>")


def _sheet(groups: Sequence[PromptGroup], tiles: Mapping[str, list[_Tile]],
           stale: Collection[str]) -> str:
    sections = []
    for group in groups:
        figures = "".join(_figure(t, group, stale) for r in group.records for t in tiles[r.key])
        sections.append(f"<section class=group id=prompt-{group.number}>"
                        f"{_group_head(group, 'header')}<div class=cards>{figures}</div>"
                        "</section>")
    return "".join(sections)


def _grid(groups: Sequence[PromptGroup], tiles: Mapping[str, list[_Tile]], axis: str,
          stale: Collection[str]) -> str:
    columns = axis_values((r for g in groups for r in g.records), axis)
    name = "seed" if axis == "seed" else "aspect"
    cells = ["<div class=corner>prompt</div>"]
    cells += [f"<div class=colhead>{_e(name)} {_e(c)}</div>" for c in columns]
    for group in groups:
        cells.append(_group_head(group, "div"))
        for column in columns:
            inside = [t for r in group.records if axis_value(r, axis) == column
                      for t in tiles[r.key]]
            cells.append("<div class=cell>" + "".join(_figure(t, group, stale) for t in inside)
                         + "</div>")
    return f"<div class=grid style=\"--columns:{len(columns)}\">{''.join(cells)}</div>"


# The views are sections shown one at a time by URL fragment (CSS :target), so opening
# index.html#grid-seed shows that view with no script. #sheet comes last in the document: it is
# shown unless another view is the target.
_CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:12px 16px;color:#ddd;
background:#1b1c1e}
a{color:#8ab4f8}h1{font-size:1.25em;margin:0 0 6px}h2{font-size:1.1em;margin:12px 0}
nav a{margin-right:1.2em}
.stats{border-collapse:collapse;margin:6px 0}.stats td,.stats th{padding:1px 10px 1px 0;
text-align:left;font-weight:normal}.stats th{color:#999}
.view{display:none}.view:target,#sheet{display:block}.view:target~#sheet{display:none}
.group{margin:0 0 18px}
.group-head{padding:6px 0}.prompt-id{color:#fff}.prompt-text{color:#bbb}
ul.common,ul.params{list-style:none;margin:4px 0 0;padding:0;display:flex;flex-wrap:wrap;
gap:4px}
ul.common li,ul.params li{background:#2c2e31;border-radius:3px;padding:0 6px;font-size:12px}
ul.common li span,ul.params li span{color:#999}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:10px}
figure{margin:0;background:#242528;border:1px solid #333;border-radius:4px;padding:6px;
min-width:0}
figure img{width:100%;height:auto;max-height:256px;object-fit:contain;display:block}
figcaption{font-size:12px;margin-top:4px;word-break:break-word}
figcaption code{color:#777;display:block}
figure.failed{border-color:#a33;background:#2a1c1c}
figure.stale{border-style:dashed;border-color:#b80;opacity:.75}
.stale-note{display:block;color:#fb3;font-size:11px}
.reason{color:#f88;min-height:80px;padding:8px;font-weight:bold;word-break:break-word}
.grid{display:grid;gap:6px;grid-template-columns:minmax(180px,1.3fr)
repeat(var(--columns),minmax(0,1fr))}
.grid>.corner,.grid>.colhead{color:#999;padding:4px;border-bottom:1px solid #333}
.grid>.group-head{border-top:1px solid #333;font-size:13px}
.grid>.cell{display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:6px;
align-content:start;border-top:1px solid #333;padding-top:6px}
"""

# Marks every image with whether it decoded: a visible count for people, and attributes a
# headless browser's DOM dump can check.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (img) {
    var good = img.complete && img.naturalWidth > 0;
    img.setAttribute('data-loaded', good ? 'yes' : 'no');
    img.setAttribute('data-natural-width', String(img.naturalWidth));
    if (good) { ok += 1; }
  });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
  var note = document.getElementById('loaded');
  if (note) { note.textContent = ok + ' of ' + imgs.length + ' thumbnails loaded'; }
});
"""


def render_html(report: Mapping[str, Any], records: Sequence[Result],
                tiles: Mapping[str, list[_Tile]], *,
                stale: Collection[str] = frozenset()) -> str:
    """The review page for ``report``, its records and their tiles (pure: no file access);
    the records whose key is in ``stale`` are marked as not in the manifest."""
    groups = prompt_groups(records)
    decisions = report.get("decisions") or {}
    stats = [
        ("items", ", ".join(f"{v} {k}" for k, v in report["by_status"].items())),
        ("images", str(report["images"])),
        ("credits spent", _fmt(report["credits_spent"])),
        ("latency p50 / p95", (f"{_fmt(report['latency_seconds']['p50'], ' s')} / "
                               f"{_fmt(report['latency_seconds']['p95'], ' s')}")),
        ("in-flight cap", cap_timeline(report["inflight_cap"]["history"])),
    ]
    if any(decisions.get(k) for k in ("accepted", "rejected", "starred")):
        stats.append(("decisions", ", ".join(f"{v} {k}" for k, v in decisions.items())))
    stats += [(f"failed: {row['category']}", f"{row['count']} — {row['explanation']}")
              for row in report["by_category"]]
    if report.get("not_in_manifest"):
        stats.append((NOT_IN_MANIFEST,
                      manifest_note(report["not_in_manifest"], include_all=report["all"])))
    stat_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in stats)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
        f"<title>batchflux review: {_e(Path(report['out_dir']).name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>batchflux review: {_e(report['out_dir'])}</h1>"
        "<nav><a href=\"#sheet\">contact sheet</a><a href=\"#grid-seed\">prompt x seed</a>"
        "<a href=\"#grid-aspect\">prompt x aspect ratio</a></nav>"
        f"<table class=stats>{stat_rows}</table><p id=loaded></p></header><main>"
        f"<section class=view id=grid-seed><h2>Prompt x seed</h2>"
        f"{_grid(groups, tiles, 'seed', stale)}</section>"
        f"<section class=view id=grid-aspect><h2>Prompt x aspect ratio</h2>"
        f"{_grid(groups, tiles, 'aspect', stale)}</section>"
        f"<section class=view id=sheet><h2>Contact sheet</h2>"
        f"{_sheet(groups, tiles, stale)}</section>"
        f"</main><script>{_SCRIPT}</script></body></html>\n"
    )


def write_review(out_dir: str | os.PathLike[str], *, thumb_size: int = DEFAULT_THUMB_SIZE,
                 include_all: bool = False) -> ReviewPage:
    """Write ``OUT/review/index.html`` and its thumbnails (re-runnable: thumbnails that are
    up to date are kept, the page is replaced atomically): the items of the current manifest,
    or with ``include_all`` every item, those not in the manifest marked.

    >>> from batchflux import write_review
    >>> page = write_review("out/nightly")
    >>> page.path.as_posix(), page.thumbnails, page.failures
    ('out/nightly/review/index.html', 12, 0)
    """
    out = Path(out_dir)
    split = split_by_manifest(out)
    results = split.results
    records = split.records(include_all=include_all)
    report = build_report(out, include_all=include_all, split=split)
    tiles = _tiles(out, records, thumb_size)
    page = out / REVIEW_DIR / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    stale = split.stale_keys() if include_all else frozenset()
    write_text_atomic(page, render_html(report, records, tiles, stale=stale))
    flat = [t for ts in tiles.values() for t in ts]
    return ReviewPage(path=page, thumbnails=sum(t.thumb is not None for t in flat),
                      failures=sum(t.thumb is None for t in flat),
                      bad_lines=results.bad_lines)
