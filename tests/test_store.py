"""The run store on its own: file names that cannot escape, torn-line repair, the resume index,
the directory lock and planted symlinks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from batchflux.errors import OutputLockedError, RunAborted
from batchflux.models import ErrorCategory, ErrorInfo, FileRecord, Result, WorkItem
from batchflux.store import (
    JOURNAL_NAME,
    RESULTS_NAME,
    STATE_DIR,
    FilenameTemplateError,
    ResumeIndex,
    RunStore,
    iter_jsonl,
    render_filename,
    repair_jsonl,
    safe_component,
)

TEMPLATE = "{prompt_id}/{key12}_{seed}_{aspect}.{ext}"


def item(prompt_id: str = "p0", *, key: str | None = None, index: int = 0,
         aspect: str = "1:1") -> WorkItem:
    key = key or hashlib.sha256(f"{prompt_id}:{index}".encode()).hexdigest()
    return WorkItem(index=index, key=key, prompt_id=prompt_id, prompt="a prompt",
                    params={"seed": 7, "aspect_ratio": aspect})


# --------------------------------------------------------------------------------------------
# File names


HOSTILE_IDS = ["../../etc", "/abs/path", "a\0b", "x" * 500, "..", ".", "", "é" * 300,
               "..\\..\\windows", "con/../..", " ", "a/b/../../../c", "~root", "$HOME"]
HOSTILE_TEMPLATES = [
    TEMPLATE,
    "../../{key}.{ext}",
    "/etc/{key}.{ext}",
    "{prompt_id}/../../../{key}.{ext}",
    "..\\..\\{key}.{ext}",
    "a\0b/{key}.{ext}",
    "//{prompt_id}//{key}.{ext}",
    "{prompt_id}" * 40 + ".{ext}",
    "./././{key}.{ext}",
    "{prompt_id.__class__}.{ext}",
]


def assert_contained(rel: str, root: Path) -> None:
    assert rel and not rel.startswith("/") and "\\" not in rel and "\0" not in rel
    for part in rel.split("/"):
        assert part not in ("", ".", ".."), rel
        assert len(part.encode()) <= 120, rel
    assert (root / rel).resolve().is_relative_to(root.resolve())


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
@pytest.mark.parametrize("prompt_id", HOSTILE_IDS)
def test_no_template_or_prompt_id_leaves_the_images_directory(
        tmp_path: Path, template: str, prompt_id: str) -> None:
    rel = render_filename(template, item(prompt_id, aspect="../16:9"), ext="png",
                          image_number=2, width=10, height=10)
    assert_contained(rel, tmp_path / "images")


def test_names_keep_what_is_safe(tmp_path: Path) -> None:
    it = item("shoe-01", aspect="16:9")
    rel = render_filename(TEMPLATE, it, ext="webp")
    assert rel == f"shoe-01/{it.key[:12]}_7_16x9.webp"
    assert render_filename(TEMPLATE, it, ext="webp", image_number=3).endswith("_16x9-3.webp")


@pytest.mark.parametrize("template", ["{nope}.{ext}", "{", "{0}", "///", ".../.."])
def test_broken_templates_are_refused_with_a_clear_error(template: str) -> None:
    with pytest.raises(FilenameTemplateError):
        render_filename(template, item(), ext="png")


def test_safe_component_never_yields_a_special_name() -> None:
    for text in ("..", ".", "", "/", "\0", "...", "._.", "a" * 1000):
        out = safe_component(text)
        assert out not in ("", ".", "..") and "/" not in out and len(out) <= 120


# --------------------------------------------------------------------------------------------
# Torn lines


def test_a_torn_tail_is_cut_and_the_good_lines_kept(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":')
    assert [r for _, r in iter_jsonl(path)] == [{"a": 1}, {"a": 2}]
    assert repair_jsonl(path) is True
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n'
    assert repair_jsonl(path) is False  # idempotent


def test_unterminated_garbage_after_a_crash_is_cut_too(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":1}\n\0\0\0\0')
    assert repair_jsonl(path) is True
    assert path.read_bytes() == b'{"a":1}\n'


def test_a_whole_garbage_line_is_kept_and_skipped_not_cut(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":1}\n\0\0\0\0\n')
    assert repair_jsonl(path) is False  # only an unterminated fragment is ever cut
    assert path.read_bytes() == b'{"a":1}\n\0\0\0\0\n'
    skipped = []
    assert [r for _, r in iter_jsonl(path, on_bad_line=skipped.append)] == [{"a": 1}]
    assert [(s.line, s.reason) for s in skipped] == [(2, "not valid JSON")]


def test_missing_files_are_not_an_error(tmp_path: Path) -> None:
    assert repair_jsonl(tmp_path / "nope.jsonl") is False
    assert list(iter_jsonl(tmp_path / "nope.jsonl")) == []


def test_opening_a_store_repairs_both_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / "images").mkdir()
    (out / "images" / "a.png").write_bytes(b"x" * 10)
    (out / RESULTS_NAME).write_bytes(b'{"key":"' + b"a" * 64 + b'","status":"ok","files":'
                                     b'[{"path":"images/a.png","bytes":10}]}\n{"ke')
    (out / STATE_DIR / JOURNAL_NAME).write_bytes(b'{"t":"intent","key":"b')
    store = RunStore(out, filename_template=TEMPLATE)
    index = store.open()
    try:
        assert sorted(store.repaired) == [JOURNAL_NAME, RESULTS_NAME]
        assert index.ok_count == 1 and index.intents == {}
        assert (out / RESULTS_NAME).read_bytes().endswith(b"}\n")
        assert (out / STATE_DIR / JOURNAL_NAME).read_bytes() == b""
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# The resume index


def _lines(path: Path, *records: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_resume_index_reads_results_and_journal(tmp_path: Path) -> None:
    k = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5)]
    _lines(tmp_path / RESULTS_NAME,
           {"key": k[0], "status": "ok", "submission": 0},
           {"key": k[1], "status": "failed", "submission": 0, "job_id": "j1",
            "error": {"category": "server_error", "retryable": True}},
           {"key": k[2], "status": "failed", "submission": 1,
            "error": {"category": "generation_failed", "retryable": False}},
           {"key": k[2], "status": "ok", "submission": 2})  # a retried failure that worked
    _lines(tmp_path / STATE_DIR / JOURNAL_NAME,
           {"t": "intent", "key": k[3], "n": 0},
           {"t": "intent", "key": k[4], "n": 0},
           {"t": "job", "key": k[4], "n": 0, "job_id": "j4"},
           {"t": "intent", "key": k[0], "n": 0},
           {"t": "job", "key": k[0], "n": 0, "job_id": "j0"})
    index = ResumeIndex.load(tmp_path, check_files=False)
    assert index.is_ok(k[0]) and index.is_ok(k[2]) and not index.is_ok(k[1])
    assert index.ok_count == 2
    prior = index.prior_failure(k[1])
    assert prior is not None and prior.retryable and prior.job_id == "j1"
    assert index.prior_failure(k[2]) is None
    intent = index.journaled_intent(k[3])  # sent, jobId unknown: resend, same key
    assert intent is not None and intent.submission == 0
    assert index.journaled_job(k[4]) == (0, "j4")  # re-attach
    assert index.journaled_job(k[0]) is None  # its ok result line closed it


def test_a_failed_result_keeps_what_the_journal_knows(tmp_path: Path) -> None:
    """A retry must reuse the key (and the body) of a submit whose answer was lost, or the
    job a killed retry had already created; only an ok line closes the journal."""
    k = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2)]
    _lines(tmp_path / RESULTS_NAME,
           {"key": k[0], "status": "failed", "submission": 1, "job_id": None,
            "error": {"category": "server_error", "retryable": True}},
           {"key": k[1], "status": "failed", "submission": 0, "job_id": "j1",
            "error": {"category": "generation_failed", "retryable": True}})
    _lines(tmp_path / STATE_DIR / JOURNAL_NAME,
           {"t": "intent", "key": k[0], "n": 1, "at": 1.5, "inputs": ["https://u/1.png"]},
           {"t": "intent", "key": k[1], "n": 0},
           {"t": "job", "key": k[1], "n": 0, "job_id": "j1"},
           {"t": "intent", "key": k[1], "n": 1},
           {"t": "job", "key": k[1], "n": 1, "job_id": "j1b"})
    index = ResumeIndex.load(tmp_path)
    intent = index.journaled_intent(k[0])
    assert intent is not None and (intent.submission, intent.inputs, intent.at) == (
        1, ("https://u/1.png",), 1.5)
    assert index.journaled_job(k[1]) == (1, "j1b") and index.journaled_intent(k[1]) is None


def test_an_ok_line_whose_image_is_gone_or_changed_size_is_to_fetch_again(
        tmp_path: Path) -> None:
    k = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.png").write_bytes(b"x" * 100)
    (tmp_path / "images" / "1.png").unlink()
    (tmp_path / "images" / "2.png").write_bytes(b"x" * 99)
    runner_line = {"key": k[0], "index": 0, "prompt_id": "p", "status": "ok",
                   "job_id": "j0", "submission": 0,
                   "files": [{"path": "images/0.png", "sha256": "0" * 64, "bytes": 100}],
                   "timings": {}}
    lines = [runner_line,
             {**runner_line, "key": k[1], "job_id": "j1", "files": [
                 {"path": "images/1.png", "sha256": "0" * 64, "bytes": 100}]},
             {**runner_line, "key": k[2], "job_id": "j2", "submission": 3, "files": [
                 {"path": "images/2.png", "sha256": "0" * 64, "bytes": 100}]}]
    # Compact, key first, as the runner writes them: read by the fast path.
    (tmp_path / RESULTS_NAME).write_text(
        "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines))
    index = ResumeIndex.load(tmp_path)
    assert index.is_ok(k[0]) and not index.is_ok(k[1]) and not index.is_ok(k[2])
    gone, changed = index.missing_files(k[1]), index.missing_files(k[2])
    assert gone is not None and (gone.job_id, gone.submission) == ("j1", 0)
    assert changed is not None and (changed.job_id, changed.submission) == ("j2", 3)


def test_lines_the_fast_path_does_not_read_are_read_as_result_records(tmp_path: Path) -> None:
    """A whole result line in another layout (indented, another key order) is read as a
    Result: an ok one whose image is gone is fetched again by its own jobId, a failed one
    gives its error; a hand-cut line is still honoured (an error that is not an object
    counts as a failure of no known category, and is no reason to stop)."""
    k = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4)]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(b"x" * 100)
    whole = Result(key=k[0], index=0, prompt_id="p", status="ok", model="flux-2-dev",
                   prompt="a mug", seed=1, params={"seed": 1}, job_id="j0", submission=2,
                   files=(FileRecord("images/0.png", "0" * 64, 100, 8, 8, "png"),))
    gone = replace(whole, key=k[1], index=1, job_id="j1", files=(
        FileRecord("images/1.png", "0" * 64, 100, 8, 8, "png"),))
    failed = replace(whole, key=k[2], index=2, status="failed", files=(), error=ErrorInfo(
        ErrorCategory.EXPIRED, "purged", False))
    (tmp_path / RESULTS_NAME).write_text("".join(
        json.dumps(dict(reversed(r.to_json().items()))) + "\n" for r in (whole, gone, failed))
        + json.dumps({"key": k[3], "status": "failed", "error": "boom", "submission": 1})
        + "\n")
    index = ResumeIndex.load(tmp_path)
    assert index.bad_lines == [] and index.ok_count == 1 and index.is_ok(k[0])
    refetch = index.missing_files(k[1])
    assert refetch is not None
    assert (refetch.category, refetch.retryable, refetch.submission, refetch.job_id) == (
        "download_failed", True, 2, "j1")
    prior = index.prior_failure(k[2])
    assert prior is not None
    assert (prior.category, prior.retryable, prior.submission, prior.job_id) == (
        "expired", False, 2, "j0")
    cut = index.prior_failure(k[3])
    assert cut is not None and (cut.category, cut.retryable, cut.submission) == (None, False, 1)


# --------------------------------------------------------------------------------------------
# The lock


def test_a_live_lock_refuses_a_second_store_with_exit_75(tmp_path: Path) -> None:
    first = RunStore(tmp_path / "out", filename_template=TEMPLATE)
    first.open()
    try:
        with pytest.raises(OutputLockedError) as caught:
            RunStore(tmp_path / "out", filename_template=TEMPLATE).open()
        assert caught.value.exit_code == 75
    finally:
        first.close()
    second = RunStore(tmp_path / "out", filename_template=TEMPLATE)
    second.open()  # released: free again
    second.close()


# --------------------------------------------------------------------------------------------
# Planted symlinks


@pytest.mark.parametrize("planted", ["images", STATE_DIR, f"{STATE_DIR}/tmp", RESULTS_NAME,
                                     f"{STATE_DIR}/{JOURNAL_NAME}"])
def test_a_planted_symlink_is_refused_and_its_target_untouched(tmp_path: Path,
                                                               planted: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    if planted in (RESULTS_NAME, f"{STATE_DIR}/{JOURNAL_NAME}"):
        victim.write_bytes(b"precious, and no newline at the end")
    else:
        victim.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    link = out / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    store = RunStore(out, filename_template=TEMPLATE)
    with pytest.raises(RunAborted) as caught:
        store.open()
    assert caught.value.exit_code == 73
    assert "symlink" in str(caught.value)
    if victim.is_file():
        assert victim.read_bytes() == b"precious, and no newline at the end"
    else:
        assert list(victim.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (out / STATE_DIR / "lock").exists()  # a refused open holds no lock


async def test_a_symlinked_subdirectory_of_images_is_not_written_through(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    store = RunStore(out, filename_template=TEMPLATE)
    store.open()
    try:
        it = item("p0")
        (out / "images" / "p0").symlink_to(outside)
        with pytest.raises(RunAborted, match="outside"):
            store.final_path(it, ext="png", number=1, width=1, height=1)
        async with store.temp_image(it, 1) as temp:
            await temp.write(b"not really an image")
        with pytest.raises(RunAborted):
            await store.commit_image(temp, it, ext="png", number=1, width=1, height=1,
                                     fmt="png")
        assert list(outside.iterdir()) == []
    finally:
        store.close()


def test_a_cut_name_keeps_its_extension_and_stays_unique() -> None:
    long_id = "catalogue-" + "x" * 200
    names = {render_filename("{prompt_id}_{key}.{ext}", item(long_id, index=i), ext="png",
                             image_number=n)
             for i in range(20) for n in (1, 2)}
    assert len(names) == 40
    for name in names:
        assert name.endswith(".png") and len(name) <= 120


def test_the_run_directory_records_the_items_of_its_manifest(tmp_path: Path) -> None:
    """What "the items of the current manifest" are, for reports and exports (issue 13)."""
    from array import array

    from batchflux.store import in_keys, read_item_keys

    assert read_item_keys(tmp_path) is None  # a directory of an older batchflux
    store = RunStore(tmp_path, filename_template=TEMPLATE)
    store.open()
    try:
        keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]
        store.write_item_keys(array("Q", sorted(int(k[:16], 16) for k in keys[:2])))
    finally:
        store.close()
    recorded = read_item_keys(tmp_path)
    assert recorded is not None and len(recorded) == 2
    assert in_keys(recorded, keys[0]) and in_keys(recorded, keys[1])
    assert not in_keys(recorded, keys[2])
