"""batchflux review in a real browser: playwright driving Debian's chromium (conftest.py) over
the app served on a loopback port, on finished simulator runs.

The screenshot in docs/review.md comes from :func:`test_the_docs_screenshot_is_from_this_code`:
it renders the app on the product-photos example and compares the committed picture with a
fresh one. After a visible change to the page, regenerate it with::

    BATCHFLUX_UPDATE_SCREENSHOT=1 .venv/bin/python -m pytest -q \
        tests/test_reviewapp_browser.py -k screenshot
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
from PIL import Image, ImageChops, ImageStat
from runner_helpers import (
    Rerolled,
    load_results,
    rerolled_run,
    review_run,
    run_batch_in_thread,
)

from batchflux.config import Simulator
from batchflux.models import RunOptions
from batchflux.reviewapp import append_decision, create_app
from batchflux.sim import SimSettings, serve_in_thread

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

ROOT = Path(__file__).resolve().parent.parent
REVIEW_SCHEMA = json.loads((ROOT / "schemas" / "review.schema.json").read_text())
SCREENSHOT = ROOT / "docs" / "review.png"
SECRET = "not for the review app's visitors"


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return review_run(tmp_path_factory.mktemp("reviewapp-browser"))


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (tmp_path / "secret.txt").write_text(SECRET)
    return copy


@pytest.fixture
def app_url(run: Path) -> Iterator[str]:
    with serve_in_thread(app=create_app(run)) as base_url:
        yield base_url


def review_lines(out: Path) -> list[tuple[str, str]]:
    """(key, decision) of every line of review.jsonl; each line schema-valid."""
    validator = jsonschema.Draft202012Validator(REVIEW_SCHEMA,
                                               format_checker=jsonschema.FormatChecker())
    lines = [json.loads(line) for line in (out / "review.jsonl").read_text().splitlines()]
    for line in lines:
        validator.validate(line)
    return [(line["key"], line["decision"]) for line in lines]


def open_app(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "yes")


def card(page: Page, key: str) -> Locator:
    return page.locator(f'.card[data-key="{key}"]')


def sheet_keys(page: Page) -> list[str]:
    keys: list[str] = page.locator("#sheet .card:not(.failed)").evaluate_all(
        "els => els.map(e => e.dataset.key)")
    return keys


def visible_keys(page: Page) -> set[str]:
    return set(page.locator(".card:visible").evaluate_all("els => els.map(e => e.dataset.key)"))


def count(page: Page, name: str) -> Locator:
    return page.locator(f'[data-count="{name}"]')


def test_shortcuts_and_buttons_write_lines_and_a_reload_shows_them(
        page: Page, app_url: str, run: Path) -> None:
    open_app(page, app_url)
    legend = page.locator("#shortcuts")
    expect(legend).to_be_visible()
    assert set(legend.locator("kbd").all_inner_texts()) >= {"a", "r", "s", "u", "j", "k",
                                                             "→", "←"}
    for text in ("accept", "reject", "star", "undo", "next", "previous"):
        assert text in legend.inner_text()
    k = sheet_keys(page)

    page.keyboard.press("j")
    expect(card(page, k[0])).to_have_class(re.compile(r"\bselected\b"))
    page.keyboard.press("a")  # decides, and moves on to the next image
    expect(card(page, k[0])).to_have_attribute("data-state", "accepted")
    expect(card(page, k[1])).to_have_class(re.compile(r"\bselected\b"))
    page.keyboard.press("r")
    expect(card(page, k[1])).to_have_attribute("data-state", "rejected")
    page.keyboard.press("s")
    expect(card(page, k[2])).to_have_attribute("data-state", "starred")
    page.keyboard.press("k")
    expect(card(page, k[2])).to_have_class(re.compile(r"\bselected\b"))
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")
    expect(card(page, k[3])).to_have_class(re.compile(r"\bselected\b"))

    card(page, k[3]).get_by_role("button", name="Accept", exact=True).click()
    expect(card(page, k[3])).to_have_attribute("data-state", "accepted")
    card(page, k[4]).get_by_role("button", name="Reject", exact=True).click()
    expect(card(page, k[4])).to_have_attribute("data-state", "rejected")
    star = card(page, k[5]).get_by_role("button", name="Star", exact=True)
    star.click()
    expect(card(page, k[5])).to_have_attribute("data-state", "starred")
    expect(star).to_have_attribute("aria-pressed", "true")
    star.click()  # pressing it again clears it
    expect(card(page, k[5])).to_have_attribute("data-state", "undecided")
    page.keyboard.press("u")  # undo the clear: star again
    expect(card(page, k[5])).to_have_attribute("data-state", "starred")
    page.keyboard.press("u")  # undo the star: undecided
    expect(card(page, k[5])).to_have_attribute("data-state", "undecided")

    assert review_lines(run) == [
        (k[0], "accept"), (k[1], "reject"), (k[2], "star"), (k[3], "accept"),
        (k[4], "reject"), (k[5], "star"), (k[5], "clear"), (k[5], "star"), (k[5], "clear")]

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "yes")
    for key, state in zip(k, ["accepted", "rejected", "starred", "accepted", "rejected",
                              "undecided"], strict=False):
        expect(card(page, key)).to_have_attribute("data-state", state)
    expect(card(page, k[0]).get_by_role("button", name="Accept", exact=True)).to_have_attribute(
        "aria-pressed", "true")
    expect(card(page, k[1]).get_by_role("button", name="Accept", exact=True)).to_have_attribute(
        "aria-pressed", "false")


def test_filters_and_live_counts(page: Page, app_url: str, run: Path) -> None:
    records = load_results(run)
    failed = {r["key"]: r for r in records if r["status"] != "ok"}
    ok = len(records) - len(failed)
    open_app(page, app_url)
    expect(count(page, "all")).to_have_text(str(len(records)))
    expect(count(page, "undecided")).to_have_text(str(ok))
    expect(count(page, "failed")).to_have_text(str(len(failed)))
    expect(count(page, "accepted")).to_have_text("0")

    k = sheet_keys(page)
    for key, name in ((k[0], "Accept"), (k[1], "Accept"), (k[2], "Reject"), (k[3], "Star")):
        card(page, key).get_by_role("button", name=name, exact=True).click()
    expect(count(page, "accepted")).to_have_text("2")
    expect(count(page, "rejected")).to_have_text("1")
    expect(count(page, "starred")).to_have_text("1")
    expect(count(page, "undecided")).to_have_text(str(ok - 4))

    page.locator('[data-filter="accepted"]').click()
    expect(page.locator(".card:visible")).to_have_count(2)
    assert visible_keys(page) == {k[0], k[1]}
    assert "show=accepted" in page.url

    page.locator('[data-filter="failed"]').click()
    expect(page.locator(".card:visible")).to_have_count(len(failed))
    assert visible_keys(page) == set(failed)
    for key, record in failed.items():
        text = card(page, key).inner_text()
        assert record["error"]["category"] in text and record["error"]["message"] in text
        expect(card(page, key).get_by_role("button")).to_have_count(0)

    page.locator('[data-filter="undecided"]').click()
    expect(page.locator(".card:visible")).to_have_count(ok - 4)
    page.keyboard.press("j")
    first = page.locator(".card.selected").get_attribute("data-key")
    page.keyboard.press("a")  # accepted: it leaves the undecided view
    expect(card(page, str(first))).to_be_hidden()
    expect(count(page, "undecided")).to_have_text(str(ok - 5))
    expect(count(page, "accepted")).to_have_text("3")

    page.goto(app_url + "/?show=rejected")  # the filter is part of the URL
    expect(page.locator("body")).to_have_attribute("data-ready", "yes")
    expect(page.locator(".card:visible")).to_have_count(1)
    assert visible_keys(page) == {k[2]}
    assert review_lines(run)[-1] == (first, "accept")


def test_items_not_in_the_manifest_are_hidden_and_counted_or_marked_with_all(
        page: Page, run: Path) -> None:
    """Issue 13.5: the manifest shortened by one aspect ratio (as a run of it records)."""
    from array import array

    from batchflux.store import key_id, save_item_keys

    records = load_results(run)
    gone = {r["key"] for r in records if r["params"]["aspect_ratio"] == "16:9"}
    save_item_keys(run, array("Q", sorted(key_id(r["key"]) for r in records
                                          if r["key"] not in gone)))
    note = page.locator("#manifest-note")
    with serve_in_thread(app=create_app(run)) as url:
        open_app(page, url)
        expect(count(page, "all")).to_have_text(str(len(records) - len(gone)))
        expect(note).to_be_visible()
        expect(note).to_have_text(f"{len(gone)} results not in the manifest "
                                  "(hidden; --all shows them)")
        assert not gone & visible_keys(page)
        expect(page.locator(".card.stale")).to_have_count(0)
    with serve_in_thread(app=create_app(run, include_all=True)) as url:
        open_app(page, url)
        expect(count(page, "all")).to_have_text(str(len(records)))
        expect(note).to_contain_text("shown with --all, marked as such")
        marked = page.locator("#sheet .card.stale")
        expect(marked).to_have_count(len(gone))
        assert set(marked.evaluate_all("nodes => nodes.map(n => n.dataset.key)")) == gone
        for node in marked.all():
            expect(node.locator(".stale-note")).to_have_text("not in the manifest")


# Union of the boxes of the view's cards (and grid row headers), and the decoded images seen.
MEASURE = """view => {
  let left = Infinity, right = -Infinity;
  for (const el of view.querySelectorAll('.card, .grid > .group-head')) {
    const r = el.getBoundingClientRect();
    if (r.width) { left = Math.min(left, r.left); right = Math.max(right, r.right); }
  }
  const seen = [...view.querySelectorAll('img')].filter(img => {
    const r = img.getBoundingClientRect();
    return img.complete && img.naturalWidth > 0 && r.width > 0 && r.top < innerHeight;
  });
  const distorted = seen.filter(img => {
    const r = img.getBoundingClientRect();
    return Math.abs(r.width / r.height - img.naturalWidth / img.naturalHeight) > 0.03;
  }).map(img => img.src);
  return {span: right - left, width: document.documentElement.clientWidth,
          images: seen.length, distorted: distorted};
}"""


@pytest.mark.parametrize("fragment, columns", [
    ("sheet", None),
    ("grid-seed", ["seed 1", "seed 2", "seed 3"]),
    ("grid-aspect", ["aspect 1:1", "aspect 16:9"]),
])
def test_each_view_opens_by_url_uses_the_width_and_shows_params_once(
        page: Page, app_url: str, run: Path, fragment: str, columns: list[str] | None) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    open_app(page, f"{app_url}/#{fragment}")
    view = page.locator(f"#{fragment}")
    expect(view).to_be_visible()
    expect(page.locator(f'nav a[data-view="{fragment}"]')).to_have_attribute(
        "aria-current", "page")
    if columns:
        assert view.locator(".colhead").all_inner_texts() == columns
    page.wait_for_function(
        "[...document.querySelectorAll('.card img')].some(i => i.complete && i.naturalWidth)")
    measured = view.evaluate(MEASURE)
    assert measured["width"] >= 1380, measured  # the 1,400 px window, less a scrollbar
    assert measured["span"] >= 0.9 * measured["width"], measured
    assert measured["images"] > 0
    assert measured["distorted"] == [], measured  # pictures keep their aspect ratio
    # Params once per prompt: in its header, never on an image.
    heads = view.locator(".group-head")
    expect(heads).to_have_count(2)
    for head in heads.all():
        assert "output_quality90" in head.inner_text().replace(" ", "").replace("\n", "")
    cards = view.locator(".card")
    expect(cards).to_have_count(len(load_results(run)))
    for text in cards.all_inner_texts():
        assert "output_quality" not in text and "output_format" not in text
        assert "seed " in text
    for item in view.locator(".card:not(.failed)").all():
        for name in ("Accept", "Reject", "Star"):
            expect(item.get_by_role("button", name=name, exact=True)).to_have_count(1)
    # Offline: everything the page asked for came from the app itself.
    assert requested and all(url.startswith((app_url, "data:")) for url in requested), requested


def test_compare_view_shows_every_image_of_one_prompt_large(page: Page, app_url: str,
                                                            run: Path) -> None:
    records = [r for r in load_results(run) if r["prompt_id"] == "vase"]
    open_app(page, f"{app_url}/#compare/1")
    view = page.locator("#compare")
    expect(view).to_have_attribute("data-group", "1")
    assert "vase" in view.locator(".group-head").inner_text()
    expect(view.locator(".card")).to_have_count(len(records))
    ok = {r["key"]: r for r in records if r["status"] == "ok"}
    page.wait_for_function("[...document.querySelectorAll('#compare img')].every("
                           "i => i.complete && i.naturalWidth > 0)")
    for key, record in ok.items():
        image = card(page, key).locator("img")
        natural = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert natural == [record["files"][0]["width"], record["files"][0]["height"]]
        box = card(page, key).bounding_box()
        assert box is not None and box["width"] >= 400  # large: at most 3 across 1,400 px
        shown = image.bounding_box()
        assert shown is not None and abs(shown["width"] / shown["height"]
                                         - natural[0] / natural[1]) < 0.03
    page.keyboard.press("j")
    page.keyboard.press("s")
    first = view.locator(".card:not(.failed)").first.get_attribute("data-key")
    assert first in ok
    expect(card(page, str(first))).to_have_attribute("data-state", "starred")
    assert review_lines(run) == [(first, "star")]
    page.locator(".compare-nav a", has_text="previous prompt").click()
    expect(view).to_have_attribute("data-group", "0")
    assert page.url.endswith("#compare/0")


def test_a_path_traversal_url_is_refused_in_the_browser(page: Page, app_url: str) -> None:
    for target in ("/files/..%2fsecret.txt", "/files/images/..%2f..%2fsecret.txt",
                   "/thumbs/..%2fsecret.txt/1"):
        response = page.goto(app_url + target)
        assert response is not None and response.status == 404, target
        assert SECRET not in page.content()


def test_decisions_from_another_tab_show_up_without_a_reload(page: Page, app_url: str,
                                                             run: Path) -> None:
    open_app(page, app_url)
    key = sheet_keys(page)[0]
    append_decision(run, key, "reject")  # another tab, another reviewer
    expect(card(page, key)).to_have_attribute("data-state", "rejected", timeout=10_000)
    expect(count(page, "rejected")).to_have_text("1")


# --------------------------------------------------------------------------------------------
# Rerolls: next to their originals, decided like any image


@pytest.fixture(scope="module")
def rerolled(finished: Path, tmp_path_factory: pytest.TempPathFactory) -> Rerolled:
    return rerolled_run(finished, tmp_path_factory.mktemp("reviewapp-browser-rerolled"))


def view_keys(page: Page, view: str) -> list[str]:
    keys: list[str] = page.locator(f"{view} .card").evaluate_all(
        "els => els.map(e => e.dataset.key)")
    return keys


def short_label(record: dict[str, Any]) -> str:
    return f"seed {record['seed']} · {record['params']['aspect_ratio']}"


@pytest.mark.parametrize("fragment", ["sheet", "grid-seed", "grid-aspect", "compare"])
def test_a_reroll_sits_right_after_its_original_in_every_view_labelled_with_its_buttons(
        page: Page, rerolled: Rerolled, tmp_path: Path, fragment: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(rerolled.out, run)
    records = {r["key"]: r for r in load_results(run)}
    groups = {"mug": 0, "vase": 1}
    with serve_in_thread(app=create_app(run)) as url:
        for original, chain in rerolled.rerolls.items():
            where = (f"compare/{groups[records[original]['prompt_id']]}"
                     if fragment == "compare" else fragment)
            open_app(page, f"{url}/#{where}")
            view = f"#{fragment}"
            keys = view_keys(page, view)
            at = keys.index(original)
            assert keys[at:at + 1 + len(chain)] == [original, *chain]
            expect(card(page, original).locator(".reroll-tag")).to_have_count(0)
            for attempt, key in enumerate(chain, start=1):
                node = card(page, key)
                expect(node).to_have_attribute("data-reroll-of", original)
                expect(node).to_have_attribute("data-attempt", str(attempt))
                tag = node.locator(".reroll-tag")
                expect(tag).to_be_visible()
                expect(tag).to_have_text(f"reroll {attempt} of {short_label(records[original])}")
                assert f"seed {records[key]['seed']}" in node.inner_text()
                for name in ("Accept", "Reject", "Star"):
                    expect(node.get_by_role("button", name=name, exact=True)).to_have_count(1)
                if fragment.startswith("grid"):  # in its original's cell, not a column of its own
                    assert node.evaluate(
                        "(n, k) => n.parentElement === document.querySelector("
                        "`.card[data-key=\"${k}\"]`).parentElement", original)
        if fragment.startswith("grid"):  # no column for a reroll's seed
            columns = {"grid-seed": ["seed 1", "seed 2", "seed 3"],
                       "grid-aspect": ["aspect 1:1", "aspect 16:9"]}[fragment]
            assert page.locator(f"{view} .colhead").all_inner_texts() == columns

        # Decided like any image: a click on its own button, a shortcut after its original.
        second_try, third_try = rerolled.rerolls[rerolled.first]
        open_app(page, f"{url}/#{'compare/0' if fragment == 'compare' else fragment}")
        card(page, third_try).get_by_role("button", name="Accept", exact=True).click()
        expect(card(page, third_try)).to_have_attribute("data-state", "accepted")
        expect(card(page, second_try)).to_have_attribute("data-state", "rejected")
        card(page, rerolled.first).locator(".caption").click()
        page.keyboard.press("j")
        expect(card(page, second_try)).to_have_class(re.compile(r"\bselected\b"))
        page.keyboard.press("s")
        expect(card(page, second_try)).to_have_attribute("data-state", "starred")
        assert review_lines(run)[-2:] == [(third_try, "accept"), (second_try, "star")]
        page.reload()
        expect(page.locator("body")).to_have_attribute("data-ready", "yes")
        expect(card(page, third_try)).to_have_attribute("data-state", "accepted")
        expect(card(page, second_try)).to_have_attribute("data-state", "starred")
        expect(card(page, rerolled.first)).to_have_attribute("data-state", "rejected")


# --------------------------------------------------------------------------------------------
# The screenshot in docs/review.md


@pytest.fixture(scope="module")
def product_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jobs/product-photos.yaml on the simulator (deterministic pictures for seed and prompt)."""
    out = tmp_path_factory.mktemp("screenshot") / "product-photos"
    settings = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="full")
    result = run_batch_in_thread(ROOT / "jobs" / "product-photos.yaml", RunOptions(out_dir=out),
                                 target=Simulator(settings=settings, job_seconds=0.2))
    assert result.exit_code == 0
    return out


def _difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference (0-255) of two pictures, at 1/10 size in grey."""
    size = (a.width // 10, a.height // 10)
    small = [im.convert("L").resize(size, Image.Resampling.BOX) for im in (a, b)]
    return float(ImageStat.Stat(ImageChops.difference(*small)).mean[0])


def test_the_docs_screenshot_is_from_this_code(page: Page, product_photos: Path,
                                               tmp_path: Path) -> None:
    """The loop once: a review by keyboard, ``--reroll rejected``, the reroll of the first
    rejected image accepted; the picture shows each reroll after the image it replaces."""
    with serve_in_thread(app=create_app(product_photos)) as url:
        open_app(page, url)
        for key in ("j", "a", "a", "r", "a", "s", "a", "r"):
            page.keyboard.press(key)
        expect(count(page, "accepted")).to_have_text("4")
        expect(count(page, "starred")).to_have_text("1")
        # Counts change once the server has written the line: the last key's is in the file.
        expect(count(page, "rejected")).to_have_text("2")
        rejected = [key for key, decision in review_lines(product_photos)
                    if decision == "reject"]
        assert len(rejected) == 2
        settings = SimSettings(job_seconds=0.2, queue_seconds=0.02, render_mode="full")
        result = run_batch_in_thread(ROOT / "jobs" / "product-photos.yaml",
                                     RunOptions(out_dir=product_photos, reroll="rejected"),
                                     target=Simulator(settings=settings, job_seconds=0.2))
        assert result.exit_code == 0 and result.summary["counts"]["new"] == 2
        rerolls = {r["reroll_of"]: r["key"] for r in load_results(product_photos)
                   if r.get("reroll_of")}
        assert sorted(rerolls) == sorted(rejected)
        page.reload()
        expect(page.locator("body")).to_have_attribute("data-ready", "yes")
        keys = sheet_keys(page)
        for original in rejected:
            assert keys[keys.index(original) + 1] == rerolls[original]
        card(page, rerolls[rejected[0]]).get_by_role("button", name="Accept", exact=True).click()
        expect(count(page, "accepted")).to_have_text("5")
        expect(count(page, "all")).to_have_text("50")
        expect(card(page, rerolls[rejected[1]]).locator(".reroll-tag")).to_be_visible()
        page.wait_for_function(
            "[...document.querySelectorAll('.card img')].filter("
            "i => i.getBoundingClientRect().top < innerHeight).every("
            "i => i.complete && i.naturalWidth > 0)")
        fresh = tmp_path / "review.png"
        page.screenshot(path=str(fresh))
    with Image.open(fresh) as im:
        assert im.size == (1400, 900)
        shot = im.copy()
    if os.environ.get("BATCHFLUX_UPDATE_SCREENSHOT"):
        shutil.copyfile(fresh, SCREENSHOT)
    assert SCREENSHOT.is_file(), (
        "docs/review.png is missing: BATCHFLUX_UPDATE_SCREENSHOT=1 pytest -k screenshot")
    assert "(review.png)" in (ROOT / "docs" / "review.md").read_text()
    with Image.open(SCREENSHOT) as committed:
        assert committed.size == shot.size
        difference = _difference(committed, shot)
    assert difference < 6, (
        f"docs/review.png differs from the page this code draws (mean difference "
        f"{difference:.1f}); regenerate it: BATCHFLUX_UPDATE_SCREENSHOT=1 pytest -k screenshot")
