"""``batchflux report OUT``: what a run did, as a terminal table, JSON, or an HTML review page.

- :func:`build_report` reads a run directory (``results.jsonl`` and ``summary.json``) into one
  JSON-able dict: counts by status and error category (with the category's one-line
  explanation), credits, p50/p95 latencies, throughput, retries and the in-flight cap over
  time. It works on merged directories too (latencies come from the result lines).
- :func:`render_table` prints that dict with rich.
- :func:`write_review` writes ``OUT/review/index.html``: a contact sheet of thumbnails grouped
  by prompt (seed, aspect ratio and params as captions, failures with their reason) and grid
  views (prompt rows x seed columns, prompt rows x aspect columns: the X/Y plot of image
  tools). The page is self-contained: one HTML file with inline CSS, relative links to
  ``review/thumbs/*.jpg`` (made with Pillow) and to the full images, nothing external, so it
  works offline from the output directory, copied or zipped as a whole. Every piece of user
  text (prompts, ids, error messages) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import os
from collections import Counter, defaultdict
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
from .runner import percentile
from .store import RESULTS_NAME, SUMMARY_NAME, BadLine

__all__ = ["ReviewPage", "build_report", "render_table", "write_review"]

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
    thumb: str | None  # relative to review/
    image: str | None  # relative to review/
    width: int | None
    height: int | None


def _thumb_name(key: str, number: int) -> str:
    return f"{key[:32]}.jpg" if number == 1 else f"{key[:32]}_{number}.jpg"


def make_thumbnail(source: Path, target: Path, *, size: int = DEFAULT_THUMB_SIZE) -> None:
    """A JPEG of at most ``size`` px on its longer side; skipped when already up to date."""
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with Image.open(source) as im:
        im.draft("RGB", (size, size))
        im.thumbnail((size, size))
        im.convert("RGB").save(tmp, "JPEG", quality=82, optimize=True)
    os.replace(tmp, target)


def _tiles(out: Path, records: Iterable[Mapping[str, Any]], size: int) -> list[_Tile]:
    review = out / REVIEW_DIR
    tiles = []
    for record in records:
        files = record.get("files") or ()
        if record.get("status") != "ok" or not files:
            tiles.append(_Tile(record, None, None, None, None))
            continue
        for number, f in enumerate(files, start=1):
            name = _thumb_name(record["key"], number)
            source = recorded_path(out, str(f["path"]))
            thumb: str | None = f"{THUMB_DIR}/{name}"
            try:
                if source is None:  # a line pointing outside images/ is not followed
                    raise FileNotFoundError(f["path"])
                make_thumbnail(source, review / THUMB_DIR / name, size=size)
            except OSError:
                thumb = None  # a missing or unreadable image: shown as such, not fatal
            tiles.append(_Tile(record, thumb, f"../{f['path']}", f.get("width"),
                               f.get("height")))
    return tiles


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _url(rel: str) -> str:
    return quote(rel, safe="/.")


def _caption(tile: _Tile) -> str:
    record = tile.record
    params = record.get("params") or {}
    bits = [f"seed {record.get('seed')}", str(params.get("aspect_ratio", ""))]
    if tile.width and tile.height:
        bits.append(f"{tile.width}x{tile.height}")
    extra = {k: v for k, v in params.items()
             if k not in ("seed", "aspect_ratio", "width", "height")}
    detail = ", ".join(f"{k}={v}" for k, v in sorted(extra.items()))
    return (f"<figcaption><b>{_e(' · '.join(b for b in bits if b))}</b>"
            f"<br><span class=params>{_e(detail)}</span>"
            f"<br><code>{_e(record['key'][:12])}</code></figcaption>")


def _figure(tile: _Tile) -> str:
    record = tile.record
    if tile.thumb is None:
        error = record.get("error") or {}
        reason = (f"{error.get('category', 'missing image')}: {error.get('message', '')}"
                  if record.get("status") != "ok" else "image missing on disk")
        return (f"<figure class=failed data-key={_e(record['key'])}>"
                f"<div class=reason>failed<br>{_e(reason)}</div>{_caption(tile)}</figure>")
    title = _e(record.get("prompt", ""))
    return (f"<figure data-key={_e(record['key'])}><a href=\"{_e(_url(tile.image or ''))}\">"
            f"<img src=\"{_e(_url(tile.thumb))}\" alt=\"{title}\" title=\"{title}\" "
            f"loading=eager></a>{_caption(tile)}</figure>")


def _groups(tiles: Sequence[_Tile]) -> dict[tuple[str, str], list[_Tile]]:
    groups: dict[tuple[str, str], list[_Tile]] = defaultdict(list)
    for tile in tiles:
        groups[(str(tile.record.get("prompt_id")), str(tile.record.get("prompt")))].append(tile)
    return groups


def _grid(groups: Mapping[tuple[str, str], list[_Tile]], axis: str) -> str:
    def column_of(tile: _Tile) -> str:
        if axis == "seed":
            return str(tile.record.get("seed"))
        return str((tile.record.get("params") or {}).get("aspect_ratio", ""))

    columns: list[str] = []
    for tiles in groups.values():
        for tile in tiles:
            value = column_of(tile)
            if value not in columns:
                columns.append(value)
    if axis == "seed":
        columns.sort(key=lambda c: (len(c), c))
    head = "".join(f"<th>{_e(axis)} {_e(c)}</th>" for c in columns)
    rows = []
    for (prompt_id, prompt), tiles in groups.items():
        cells = []
        for column in columns:
            inside = [t for t in tiles if column_of(t) == column]
            cells.append("<td>" + "".join(_figure(t) for t in inside) + "</td>")
        rows.append(f"<tr><th class=prompt><b>{_e(prompt_id)}</b><br>{_e(prompt)}</th>"
                    + "".join(cells) + "</tr>")
    return (f"<table class=grid><thead><tr><th>prompt</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{margin-top:2em;border-bottom:1px solid #ccc}
nav a{margin-right:1em}
.stats td,.stats th{padding:2px 10px;text-align:left}
.sheet{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:260px;background:#fff;border:1px solid #ddd;padding:4px}
figure img{max-width:256px;max-height:256px;display:block;margin:auto}
figcaption{font-size:12px;word-break:break-word}.params{color:#666}
figure.failed{border-color:#c33;background:#fff4f4}
.reason{color:#a00;min-height:80px;padding:8px;font-weight:bold;word-break:break-word}
table.grid{border-collapse:collapse}table.grid td,table.grid th{border:1px solid #ddd;
vertical-align:top;padding:4px}th.prompt{max-width:240px;text-align:left;font-weight:normal}
.prompt-text{color:#444}
table.grid figure{width:172px}table.grid figure img{max-width:168px;max-height:168px}
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


def render_html(report: Mapping[str, Any], tiles: Sequence[_Tile]) -> str:
    """The review page for ``report`` and its tiles (pure: no file access)."""
    groups = _groups(tiles)
    stats = [
        ("items", ", ".join(f"{v} {k}" for k, v in report["by_status"].items())),
        ("images", str(report["images"])),
        ("credits spent", _fmt(report["credits_spent"])),
        ("latency p50 / p95", (f"{_fmt(report['latency_seconds']['p50'], ' s')} / "
                               f"{_fmt(report['latency_seconds']['p95'], ' s')}")),
        ("in-flight cap", cap_timeline(report["inflight_cap"]["history"])),
    ]
    stats += [(f"failed: {row['category']}", f"{row['count']} — {row['explanation']}")
              for row in report["by_category"]]
    stat_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in stats)
    sheet = []
    for n, ((prompt_id, prompt), group) in enumerate(groups.items()):
        sheet.append(f"<section id=prompt-{n}><h3>{_e(prompt_id)} "
                     f"<span class=prompt-text>{_e(prompt)}</span></h3><div class=sheet>"
                     + "".join(_figure(t) for t in group) + "</div></section>")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
        f"<title>batchflux review: {_e(Path(report['out_dir']).name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>batchflux review: {_e(report['out_dir'])}</h1>"
        "<nav><a href=\"#sheet\">contact sheet</a><a href=\"#grid-seed\">prompt x seed</a>"
        "<a href=\"#grid-aspect\">prompt x aspect ratio</a></nav>"
        f"<table class=stats>{stat_rows}</table><p id=loaded></p>"
        f"<h2 id=sheet>Contact sheet</h2>{''.join(sheet)}"
        f"<h2 id=grid-seed>Prompt x seed</h2>{_grid(groups, 'seed')}"
        f"<h2 id=grid-aspect>Prompt x aspect ratio</h2>{_grid(groups, 'aspect')}"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_review(out_dir: str | os.PathLike[str], *,
                 thumb_size: int = DEFAULT_THUMB_SIZE) -> ReviewPage:
    """Write ``OUT/review/index.html`` and its thumbnails (re-runnable: thumbnails that are
    up to date are kept, the page is replaced atomically)."""
    out = Path(out_dir)
    results = _results(out)
    report = build_report(out)
    tiles = _tiles(out, results.ordered(), thumb_size)
    page = out / REVIEW_DIR / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(f".index.html.{os.getpid()}.tmp")
    tmp.write_text(render_html(report, tiles), encoding="utf-8")
    os.replace(tmp, page)
    return ReviewPage(path=page, thumbnails=sum(t.thumb is not None for t in tiles),
                      failures=sum(t.thumb is None for t in tiles),
                      bad_lines=results.bad_lines)
