"""batchflux report: the table, the JSON, and the offline HTML review page (checked in Chromium,
driven by playwright: the fixtures are in conftest.py)."""

from __future__ import annotations

import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image
from runner_helpers import load_results, run_batch_in_thread

from batchflux.cli import main
from batchflux.config import Simulator
from batchflux.models import ErrorCategory, RunOptions
from batchflux.report import build_report, cap_timeline, write_review
from batchflux.results import read_results
from batchflux.review import prompt_groups
from batchflux.sim import SimSettings

if TYPE_CHECKING:
    from playwright.sync_api import Page

HOSTILE = 'a mug <script>alert("x")</script> & <img src=x onerror=alert(1)> on oak'

MANIFEST = f"""\
prompts:
  - id: mug
    text: {json.dumps(HOSTILE)}
  - id: vase
    text: a blue glass vase on linen, studio photo
defaults:
  output_quality: 90
grid:
  seeds: [1, 2, 3, 4]
  aspect_ratio: ["1:1", "16:9"]
"""
ITEMS = 16


@pytest.fixture(scope="module")
def run_with_failures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 items, a few FAILED by content policy (not retried), the rest ok."""
    base = tmp_path_factory.mktemp("review")
    manifest = base / "manifest.yaml"
    manifest.write_text(MANIFEST)
    out = base / "out"
    settings = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="full",
                           fail_rate=0.3, fail_capacity_share=0.0, fault_seed=5)
    result = run_batch_in_thread(manifest, RunOptions(out_dir=out),
                                 target=Simulator(settings=settings, job_seconds=0.2))
    counts = result.summary["counts"]
    assert counts["ok"] + counts["failed"] == ITEMS
    assert 0 < counts["failed"] < ITEMS, counts  # fault_seed 5 gives both
    return out


def test_report_counts_categories_credits_and_latencies(run_with_failures: Path) -> None:
    records = load_results(run_with_failures)
    report = build_report(run_with_failures)
    failed = sum(r["status"] == "failed" for r in records)
    assert report["items"] == ITEMS
    assert report["by_status"] == {"failed": failed, "ok": ITEMS - failed}
    (row,) = report["by_category"]
    assert row == {"category": "generation_failed", "count": failed,
                   "explanation": ErrorCategory.GENERATION_FAILED.explanation}
    assert report["credits_spent"] == sum(r["credit_cost"] or 0 for r in records)
    totals = sorted(r["timings"]["total"] for r in records if r["status"] == "ok")
    assert totals[0] <= report["latency_seconds"]["p50"] <= report["latency_seconds"]["p95"]
    assert report["latency_seconds"]["p95"] <= totals[-1]
    assert report["inflight_cap"]["history"]  # the cap over time, from summary.json
    assert report["images"] == ITEMS - failed


def test_report_command_prints_a_table_and_json(run_with_failures: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_with_failures)]) == 0
    table = capsys.readouterr().out
    for text in ("latency p50 / p95", "credits spent", "in-flight cap", "generation_failed",
                 "throughput", "retries"):
        assert text in table
    assert "the job ended FAILED" in table  # the category's one-line explanation
    assert main(["report", str(run_with_failures), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["items"] == ITEMS and data["by_category"][0]["category"] == "generation_failed"


def test_report_on_something_else_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["report", str(tmp_path)]) == 2


def test_cap_timeline_shortens_long_histories() -> None:
    assert cap_timeline([]) == "-"
    assert cap_timeline([[0, 16], [3.5, 8]]) == "16 @0s -> 8 @3.5s"
    assert "more" in cap_timeline([[i, i] for i in range(40)])


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.scripts_with_src = 0
        self.stylesheets = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        elif tag == "script" and a.get("src"):
            self.scripts_with_src += 1
        elif tag == "link":
            self.stylesheets += 1


def test_html_page_is_offline_escaped_and_thumbnailed(run_with_failures: Path) -> None:
    page = write_review(run_with_failures)
    assert page.path == run_with_failures / "review" / "index.html"
    text = page.path.read_text(encoding="utf-8")
    records = load_results(run_with_failures)
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    assert page.thumbnails == len(ok) and page.failures == len(failed)

    # User text never becomes markup.
    assert "<script>alert" not in text
    assert "<img src=x" not in text
    assert html.escape(HOSTILE) in text
    assert text.count("<script>") == 1  # only the page's own load check

    parsed = _Page()
    parsed.feed(text)
    assert parsed.scripts_with_src == 0 and parsed.stylesheets == 0
    assert not re.search(r"(src|href)=\"?(https?:)?//", text)  # nothing external
    # Every thumbnail: a relative file in review/thumbs, a real JPEG at most 256 px.
    srcs = {str(img["src"]) for img in parsed.imgs}
    assert len(srcs) == len(ok)
    for src in srcs:
        assert src.startswith("thumbs/")
        with Image.open(page.path.parent / src) as im:
            assert im.format == "JPEG" and max(im.size) <= 256
    # Full images are linked relative to the page.
    for link in (link for link in parsed.links if not link.startswith("#")):
        assert (page.path.parent / link).resolve().is_file(), link
    # Failures show their reason; captions carry seed and aspect ratio.
    for record in failed:
        assert html.escape(record["error"]["message"]) in text
    assert "seed 1 · 16:9" in text
    # Grids: prompt rows x seed columns and x aspect columns.
    assert ("<div class=colhead>seed 1</div><div class=colhead>seed 2</div>"
            "<div class=colhead>seed 3</div><div class=colhead>seed 4</div>") in text
    assert "<div class=colhead>aspect 1:1</div><div class=colhead>aspect 16:9</div>" in text
    # Params common to a prompt's items are shown once per group and view, not per image.
    assert text.count("<span>output_quality</span> 90") == 3 * 2  # 3 views x 2 prompts


def test_html_page_is_rewritten_in_place(run_with_failures: Path) -> None:
    first = write_review(run_with_failures)
    thumbs = sorted((first.path.parent / "thumbs").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in thumbs]
    again = write_review(run_with_failures)
    assert sorted((again.path.parent / "thumbs").iterdir()) == thumbs
    assert [p.stat().st_mtime_ns for p in thumbs] == mtimes  # up-to-date thumbs are kept
    assert not list(again.path.parent.glob(".*tmp"))


VIEWS = ("sheet", "grid-seed", "grid-aspect")

# In the shown view: the horizontal extent of the images and row headers, and how many images
# are decoded and inside the viewport.
MEASURE = """view => {
  const parts = view.querySelectorAll('figure, .grid > .group-head');
  let left = Infinity, right = -Infinity;
  for (const el of parts) {
    const r = el.getBoundingClientRect();
    left = Math.min(left, r.left); right = Math.max(right, r.right);
  }
  const seen = [...view.querySelectorAll('img')].filter(img => {
    const r = img.getBoundingClientRect();
    return img.complete && img.naturalWidth > 0 && r.width > 0 && r.bottom > 0
      && r.top < window.innerHeight;
  });
  return {span: right - left, width: document.documentElement.clientWidth,
          visible_images: seen.length};
}"""


def test_every_image_loads_in_chromium_from_a_copy(run_with_failures: Path, tmp_path: Path,
                                                   page: Page) -> None:
    review = write_review(run_with_failures)
    # The page must work from anywhere: review it from a copy of the output directory.
    copy = tmp_path / "copied-run"
    shutil.copytree(run_with_failures, copy)
    page.goto((copy / "review" / "index.html").as_uri())
    page.wait_for_function("document.body.hasAttribute('data-images-loaded')")
    expected = review.path.read_text().count("<img ")
    assert expected > 0
    assert page.locator("body").get_attribute("data-images-total") == str(expected)
    assert page.locator("body").get_attribute("data-images-loaded") == str(expected), (
        page.locator("img[data-loaded=no]").evaluate_all("els => els.map(e => e.src)"))
    widths = page.locator("img").evaluate_all("els => els.map(e => e.naturalWidth)")
    assert len(widths) == expected and all(0 < w <= 256 for w in widths)


@pytest.mark.parametrize("view", VIEWS)
def test_each_view_opened_by_url_shows_its_images_across_the_window(
        run_with_failures: Path, page: Page, view: str) -> None:
    review = write_review(run_with_failures)
    page.goto(f"{review.path.as_uri()}#{view}")
    page.wait_for_function("document.body.hasAttribute('data-images-loaded')")
    shown = page.locator("section.view:visible")
    assert shown.evaluate_all("els => els.map(e => e.id)") == [view]
    measured = shown.evaluate(MEASURE)
    assert measured["width"] >= 1380  # the 1,400 px viewport, less a scrollbar
    assert measured["span"] >= 0.9 * measured["width"], measured
    assert measured["visible_images"] > 0, measured


def test_no_image_repeats_the_params_of_its_prompt(run_with_failures: Path, page: Page) -> None:
    review = write_review(run_with_failures)
    records = read_results(run_with_failures).ordered()
    groups = prompt_groups(records)
    common = {name for group in groups for name, _ in group.common}
    assert {"output_quality", "output_format"} <= common
    group_of = {r.key: group for group in groups for r in group.records}
    for view in VIEWS:
        page.goto(f"{review.path.as_uri()}#{view}")
        shown = page.locator(f"#{view}")
        figures = shown.locator("figure")
        assert figures.count() == len(records)
        for figure in figures.all():
            text = figure.inner_text()
            group = group_of[str(figure.get_attribute("data-key"))]
            assert "seed " in text
            for name, _ in group.common:
                assert name not in text, (view, text)
        # ...and each group's header shows them once.
        assert shown.inner_text().count("output_quality") == len(groups)
