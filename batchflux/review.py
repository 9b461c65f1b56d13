"""``batchflux report OUT``: what a run did, as a terminal table, JSON, or an HTML review page.

- :func:`build_report` reads a run directory (``results.jsonl``, ``summary.json`` and the
  review decisions in ``review.jsonl``) into one JSON-able dict: counts by status and error
  category (with the category's one-line explanation), credits, p50/p95 latencies, throughput,
  retries, the in-flight cap over time, and the images accepted, rejected, starred and still
  undecided. It works on merged directories too (latencies come from the result lines).
- :func:`render_table` prints that dict with rich.
- :func:`write_review` writes ``OUT/review/index.html``: a contact sheet of thumbnails grouped
  by prompt and grid views (prompt rows x seed columns, prompt rows x aspect columns: the X/Y
  plot of image tools), one view at a time by URL fragment (``#sheet``, ``#grid-seed``,
  ``#grid-aspect``; CSS ``:target``, no script needed). Each group's header shows its prompt
  and the params all its items share, once; each image shows only what varies (seed, aspect
  ratio, size, any other param that differs); failures show their reason. Columns fill the
  window (CSS grid, ``auto-fill``). The page is self-contained: one HTML file with inline CSS,
  relative links to ``review/thumbs/*.jpg`` (made with Pillow) and to the full images, nothing
  external, so it works offline from the output directory, copied or zipped as a whole. Every
  piece of user text (prompts, ids, error messages) is HTML-escaped.

The grouping (:func:`prompt_groups`, :func:`varying_params`, :func:`image_label`) and the
thumbnails (:func:`make_thumbnail`, cached in ``OUT/review/thumbs/``) are shared with the
review app (``batchflux review``, :mod:`batchflux.reviewapp`).
"""

from __future__ import annotations

import html
import json
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image
from rich.console import Console
from rich.table import Table

from .errors import UsageError
from .models import ErrorCategory
from .results import RunResults, read_results, recorded_path
from .reviewapp.decisions import count_states, read_decisions
from .runner import percentile
from .store import RESULTS_NAME, SUMMARY_NAME, BadLine

__all__ = [
    "AXES",
    "PromptGroup",
    "ReviewPage",
    "axis_value",
    "axis_values",
    "build_report",
    "format_value",
    "image_label",
    "make_thumbnail",
    "prompt_groups",
    "render_table",
    "run_records",
    "thumb_path",
    "varying_params",
    "write_review",
]

REVIEW_DIR = "review"
THUMB_DIR = "thumbs"
DEFAULT_THUMB_SIZE = 256


# --------------------------------------------------------------------------------------------
# Numbers


def _percentile(values: Sequence[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, 3)


def _explain(category: str) -> str:
    try:
        return ErrorCategory(category).explanation
    except ValueError:
        return "unknown category"


def _results(out: Path) -> RunResults:
    if not (out / RESULTS_NAME).is_file():
        raise UsageError(f"{out} is not a batchflux run directory (no {RESULTS_NAME})")
    return read_results(out)


def run_records(out: Path) -> list[dict[str, Any]]:
    """The result that counts for each item of run ``out``, in manifest order."""
    return _results(out).ordered()


def _summary(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def build_report(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything ``batchflux report`` shows, as one JSON-able dict.

    ``bad_lines`` lists the lines of results.jsonl that could not be read (``file``, ``line``,
    ``reason``); every other line counts.
    """
    out = Path(out_dir)
    results = _results(out)
    records = results.ordered()
    summary = _summary(out)
    status = Counter(str(r.get("status")) for r in records)
    categories = Counter(str((r.get("error") or {}).get("category")) for r in records
                         if r.get("status") != "ok")
    ok = [r for r in records if r.get("status") == "ok"]
    latencies = [float((r.get("timings") or {}).get("total") or 0.0) for r in ok]
    generating = [float((r.get("timings") or {}).get("generating") or 0.0) for r in ok
                  if (r.get("timings") or {}).get("generating") is not None]
    cap = summary.get("inflight_cap") or {}
    decisions = count_states((r["key"] for r in ok if r.get("files")), read_decisions(out))
    return {
        "out_dir": str(out),
        "items": len(records),
        "by_status": dict(sorted(status.items())),
        "by_category": [
            {"category": name, "count": count, "explanation": _explain(name)}
            for name, count in sorted(categories.items())
        ],
        "credits_spent": sum((r.get("credit_cost") or 0) for r in records),
        "images": sum(len(r.get("files") or ()) for r in ok),
        "bytes": sum(f.get("bytes", 0) for r in ok for f in r.get("files") or ()),
        "latency_seconds": {"p50": _percentile(latencies, 0.5),
                            "p95": _percentile(latencies, 0.95)},
        "generating_seconds": {"p50": _percentile(generating, 0.5),
                               "p95": _percentile(generating, 0.95)},
        "throughput": summary.get("throughput"),
        "elapsed_seconds": summary.get("elapsed_seconds"),
        "retries": summary.get("retries"),
        "resubmissions": summary.get("resubmissions"),
        "jobs": sum(int(r.get("jobs") or 0) for r in records),
        "polls": sum(int(r.get("polls") or 0) for r in records),
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
        steps = steps[: limit // 2] + [f"... {len(steps) - limit} more ..."] + steps[-limit // 2:]
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
    if report["by_category"]:
        errors = Table(title="failures by category")
        errors.add_column("category", style="red")
        errors.add_column("items", justify="right")
        errors.add_column("what it means")
        for row in report["by_category"]:
            errors.add_row(row["category"], str(row["count"]), row["explanation"])
        console.print(errors)


# --------------------------------------------------------------------------------------------
# Groups: what the items of one prompt share is shown once (this page and `batchflux review`)

#: Shown on each image: what tells the images of one prompt apart.
PER_IMAGE_PARAMS = ("seed", "aspect_ratio", "width", "height")
#: The grid views: prompt rows x columns of one of these.
AXES = ("seed", "aspect")


@dataclass(frozen=True, slots=True)
class PromptGroup:
    """The items of one prompt (same prompt id and resolved text), in run order.

    ``common`` holds the params sent with the same value to every item of the group (seed,
    aspect ratio and size aside: those are shown on each image). A page shows them once, in the
    group's header; each image shows only :func:`image_label` and :func:`varying_params`.
    """

    number: int
    prompt_id: str
    prompt: str
    common: tuple[tuple[str, Any], ...]
    records: tuple[Mapping[str, Any], ...]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def prompt_groups(records: Iterable[Mapping[str, Any]]) -> list[PromptGroup]:
    """``records`` grouped by prompt, groups in order of first appearance."""
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        key = (str(record.get("prompt_id")), str(record.get("prompt", "")))
        grouped.setdefault(key, []).append(record)
    groups = []
    for number, ((prompt_id, prompt), members) in enumerate(grouped.items()):
        params = [record.get("params") or {} for record in members]
        names = sorted({name for p in params for name in p} - set(PER_IMAGE_PARAMS))
        common = tuple(
            (name, params[0][name]) for name in names
            if all(name in p for p in params)
            and len({_canonical(p[name]) for p in params}) == 1
        )
        groups.append(PromptGroup(number, prompt_id, prompt, common, tuple(members)))
    return groups


def varying_params(record: Mapping[str, Any], group: PromptGroup) -> list[tuple[str, Any]]:
    """The params of ``record`` that are not common to its group (nor shown in its label)."""
    shared = {name for name, _ in group.common}
    params = record.get("params") or {}
    return [(name, params[name]) for name in sorted(params)
            if name not in shared and name not in PER_IMAGE_PARAMS]


def format_value(value: Any) -> str:
    """A param value as a person reads it: ``true``, ``a.png, b.png``, ``16:9``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return _canonical(value)
    return str(value)


def image_label(record: Mapping[str, Any], file: Mapping[str, Any] | None = None) -> str:
    """``seed 1003 · 1:1 · 1024x1024``: seed, aspect ratio and size of one image."""
    params = record.get("params") or {}
    bits = [f"seed {record.get('seed')}"]
    if params.get("aspect_ratio"):
        bits.append(str(params["aspect_ratio"]))
    width = (file or {}).get("width") or params.get("width")
    height = (file or {}).get("height") or params.get("height")
    if width and height:
        bits.append(f"{width}x{height}")
    return " · ".join(bits)


def axis_value(record: Mapping[str, Any], axis: str) -> str:
    """The column of ``record`` in the prompt x ``axis`` grid (``axis`` in :data:`AXES`)."""
    if axis == "seed":
        return str(record.get("seed"))
    return str((record.get("params") or {}).get("aspect_ratio", ""))


def axis_values(records: Iterable[Mapping[str, Any]], axis: str) -> list[str]:
    """The columns of the prompt x ``axis`` grid: seeds in numeric order, aspect ratios in
    order of first appearance."""
    values = list(dict.fromkeys(axis_value(record, axis) for record in records))
    if axis == "seed":
        values.sort(key=lambda v: (len(v), v))
    return values


# --------------------------------------------------------------------------------------------
# Thumbnails (one implementation: this page and `batchflux review` share OUT/review/thumbs/)


def thumb_name(key: str, number: int) -> str:
    """The file name of the thumbnail of image ``number`` (1-based) of item ``key``."""
    return f"{key[:32]}.jpg" if number == 1 else f"{key[:32]}_{number}.jpg"


def thumb_path(out: Path, key: str, number: int) -> Path:
    """Where the thumbnail of image ``number`` of item ``key`` is cached in run ``out``."""
    return out / REVIEW_DIR / THUMB_DIR / thumb_name(key, number)


def make_thumbnail(source: Path, target: Path, *, size: int = DEFAULT_THUMB_SIZE) -> None:
    """A JPEG of at most ``size`` px on its longer side; skipped when already up to date.

    Safe to call from several threads or processes at once: each writes its own temporary file
    and the last rename wins (both wrote the same picture).
    """
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with Image.open(source) as im:
            im.draft("RGB", (size, size))
            im.thumbnail((size, size))
            im.convert("RGB").save(tmp, "JPEG", quality=82, optimize=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


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
    record: Mapping[str, Any]
    file: Mapping[str, Any] | None
    thumb: str | None  # relative to review/
    image: str | None  # relative to review/


def _tiles(out: Path, records: Iterable[Mapping[str, Any]], size: int) -> dict[str, list[_Tile]]:
    """Each record's tiles (one per image, or one failure tile), by key."""
    tiles: dict[str, list[_Tile]] = {}
    for record in records:
        files = record.get("files") or ()
        if record.get("status") != "ok" or not files:
            tiles[record["key"]] = [_Tile(record, None, None, None)]
            continue
        mine = tiles[record["key"]] = []
        for number, f in enumerate(files, start=1):
            thumb: str | None = f"{THUMB_DIR}/{thumb_name(record['key'], number)}"
            source = recorded_path(out, str(f["path"]))
            try:
                if source is None:  # a line pointing outside images/ is not followed
                    raise FileNotFoundError(f["path"])
                make_thumbnail(source, thumb_path(out, record["key"], number), size=size)
            except OSError:
                thumb = None  # a missing or unreadable image: shown as such, not fatal
            mine.append(_Tile(record, f, thumb, f"../{f['path']}"))
    return tiles


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _url(rel: str) -> str:
    return quote(rel, safe="/.")


def _figure(tile: _Tile, group: PromptGroup) -> str:
    record = tile.record
    varying = "".join(f"<li><span>{_e(k)}</span> {_e(format_value(v))}</li>"
                      for k, v in varying_params(record, group))
    caption = (f"<figcaption><b>{_e(image_label(record, tile.file))}</b>"
               + (f"<ul class=params>{varying}</ul>" if varying else "")
               + f"<code>{_e(record['key'][:12])}</code></figcaption>")
    if tile.thumb is None:
        error = record.get("error") or {}
        reason = (f"{error.get('category', 'missing image')}: {error.get('message', '')}"
                  if record.get("status") != "ok" else "image missing on disk")
        return (f"<figure class=failed data-key={_e(record['key'])}>"
                f"<div class=reason>failed<br>{_e(reason)}</div>{caption}</figure>")
    title = _e(record.get("prompt", ""))
    return (f"<figure data-key={_e(record['key'])}><a href=\"{_e(_url(tile.image or ''))}\">"
            f"<img src=\"{_e(_url(tile.thumb))}\" alt=\"{title}\" loading=eager></a>"
            f"{caption}</figure>")


def _group_head(group: PromptGroup, tag: str) -> str:
    common = "".join(f"<li><span>{_e(k)}</span> {_e(format_value(v))}</li>"
                     for k, v in group.common)
    return (f"<{tag} class=group-head><b class=prompt-id>{_e(group.prompt_id)}</b> "
            f"<span class=prompt-text>{_e(group.prompt)}</span>"
            + (f"<ul class=common>{common}</ul>" if common else "") + f"</{tag}>")


def _sheet(groups: Sequence[PromptGroup], tiles: Mapping[str, list[_Tile]]) -> str:
    sections = []
    for group in groups:
        figures = "".join(_figure(t, group) for r in group.records for t in tiles[r["key"]])
        sections.append(f"<section class=group id=prompt-{group.number}>"
                        f"{_group_head(group, 'header')}<div class=cards>{figures}</div>"
                        "</section>")
    return "".join(sections)


def _grid(groups: Sequence[PromptGroup], tiles: Mapping[str, list[_Tile]], axis: str) -> str:
    columns = axis_values((r for g in groups for r in g.records), axis)
    name = "seed" if axis == "seed" else "aspect"
    cells = ["<div class=corner>prompt</div>"]
    cells += [f"<div class=colhead>{_e(name)} {_e(c)}</div>" for c in columns]
    for group in groups:
        cells.append(_group_head(group, "div"))
        for column in columns:
            inside = [t for r in group.records if axis_value(r, axis) == column
                      for t in tiles[r["key"]]]
            cells.append("<div class=cell>" + "".join(_figure(t, group) for t in inside)
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
figcaption{font-size:12px;margin-top:4px;word-break:break-word}figcaption code{color:#777;display:block}
figure.failed{border-color:#a33;background:#2a1c1c}
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


def render_html(report: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                tiles: Mapping[str, list[_Tile]]) -> str:
    """The review page for ``report``, its records and their tiles (pure: no file access)."""
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
        f"{_grid(groups, tiles, 'seed')}</section>"
        f"<section class=view id=grid-aspect><h2>Prompt x aspect ratio</h2>"
        f"{_grid(groups, tiles, 'aspect')}</section>"
        f"<section class=view id=sheet><h2>Contact sheet</h2>{_sheet(groups, tiles)}</section>"
        f"</main><script>{_SCRIPT}</script></body></html>\n"
    )


def write_review(out_dir: str | os.PathLike[str], *,
                 thumb_size: int = DEFAULT_THUMB_SIZE) -> ReviewPage:
    """Write ``OUT/review/index.html`` and its thumbnails (re-runnable: thumbnails that are
    up to date are kept, the page is replaced atomically)."""
    out = Path(out_dir)
    results = _results(out)
    records = results.ordered()
    report = build_report(out)
    tiles = _tiles(out, records, thumb_size)
    page = out / REVIEW_DIR / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(f".index.html.{os.getpid()}.tmp")
    tmp.write_text(render_html(report, records, tiles), encoding="utf-8")
    os.replace(tmp, page)
    flat = [t for ts in tiles.values() for t in ts]
    return ReviewPage(path=page, thumbnails=sum(t.thumb is not None for t in flat),
                      failures=sum(t.thumb is None for t in flat),
                      bad_lines=results.bad_lines)
