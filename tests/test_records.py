"""Issue 12, point 1: result records match schemas/result.schema.json both ways.

(a) Every Result the code can make serializes (``to_json``) to a line the schema accepts;
(b) every line the schema accepts (its own examples, hand-written lines, lines of older runs
    without ``replayed``, ``meta`` or ``duplicate_of``) parses (``from_json``) and
    round-trips;
(c) the store's fast resume pattern (``models.OK_LINE``) recognises exactly the ok lines the
    store writes, whatever their strings hold, and never a failed one.

The records are generated from a seeded random source (reproducible, no extra dependency),
with strings that hold what could fool a pattern: quotes, braces, backslashes, and
``"status":"ok"`` itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from batchflux.models import (
    FILES_FIELD,
    FLUX_MODELS,
    OK_LINE,
    ErrorCategory,
    ErrorInfo,
    FileRecord,
    RecordError,
    Result,
    Timings,
)
from batchflux.store import RESULTS_NAME, ResumeIndex, RunStore

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "schemas" / "result.schema.json").read_text(encoding="utf-8"))

# jsonschema checks "date-time" only with an optional package; check it here, strictly.
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return datetime.fromisoformat(value).tzinfo is not None


VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=FORMATS)


def schema_errors(line: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATOR.iter_errors(line)]


# --------------------------------------------------------------------------------------------
# Generated records

#: Pieces of text that could fool a pattern reading JSON lines without parsing them.
TRAPS = ('"status":"ok"', '","status":"ok","', '{"key":"', '"}', "{", "}", "[", "]", ",",
         '","files":[', '],"timings":', "\\", '\\"', "\n", "\t", "\u2028", "café", "🦊",
         '{"key":"' + "a" * 64 + '","status":"ok"}', "'", ":", " ")


def text(rng: random.Random, *, min_length: int = 0, max_length: int = 60) -> str:
    """Random text built of traps and plain words."""
    parts: list[str] = []
    while len("".join(parts)) < min_length or (rng.random() < 0.7 and len(parts) < 12):
        parts.append(rng.choice(TRAPS) if rng.random() < 0.5
                     else rng.choice(("mug", "oak table", "Studio", "x", "seed 7")))
    return "".join(parts)[:max_length] or "p"


def timestamp(rng: random.Random) -> str:
    moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.uniform(0, 3e7))
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seconds(rng: random.Random) -> float | None:
    return rng.choice((None, 0.0, 0, round(rng.uniform(0, 700), 3), 12))


def params(rng: random.Random, seed: int) -> dict[str, Any]:
    aspect = rng.choice(("1:1", "16:9", "9:16", "4:3", "custom", "match_input_image"))
    sent: dict[str, Any] = {"aspect_ratio": aspect}
    if aspect == "custom":
        sent["width"], sent["height"] = rng.randrange(256, 2049), rng.randrange(256, 2049)
    sent["seed"] = seed
    if rng.random() < 0.9:
        sent["output_format"] = rng.choice(("jpg", "png", "webp"))
        sent["output_quality"] = rng.randrange(0, 101)
        sent["go_fast"] = rng.random() < 0.5
    if rng.random() < 0.2:
        sent["input_images"] = [f"https://example.com/{text(rng)}.png"
                                for _ in range(rng.randrange(0, 11))]
    return sent


def files(rng: random.Random, key: str) -> tuple[FileRecord, ...]:
    return tuple(
        FileRecord(path=f"images/{text(rng, min_length=1)}/{key[:12]}_{n}.png",
                   sha256=rng.randbytes(32).hex(), bytes=rng.randrange(1, 1 << 26),
                   width=rng.randrange(1, 2049), height=rng.randrange(1, 2049),
                   format=rng.choice(("jpg", "png", "webp")),
                   check=rng.choice(("decode", "structure")))
        for n in range(1, rng.randrange(2, 5)))


def result(rng: random.Random, index: int, category: ErrorCategory | None) -> Result:
    """One record as the run could write it: ok when ``category`` is None."""
    key = rng.randbytes(32).hex()
    seed = rng.randrange(0, 1 << 32)
    # A reroll (batchflux.reroll) names its original item's key and which reroll it is.
    reroll_of = rng.choice((None, None, None, rng.randbytes(32).hex()))
    error = None if category is None else ErrorInfo(
        category, text(rng), rng.choice((category.retryable, not category.retryable)),
        rng.choice((None, 400, 402, 429, 500, 503)))
    return Result(
        key=key, index=index, prompt_id=text(rng, min_length=1), status=
        "ok" if error is None else "failed", model=rng.choice(FLUX_MODELS),
        prompt=text(rng, min_length=1, max_length=2000), seed=seed, params=params(rng, seed),
        template=rng.choice((None, text(rng))),
        vars=rng.choice(({}, {"bg": text(rng), "n": 3, "flag": True})),
        job_id=rng.choice((None, str(uuid.UUID(bytes=rng.randbytes(16))))),
        submission=rng.randrange(0, 4), jobs=rng.randrange(0, 4), polls=rng.randrange(0, 30),
        credit_cost=rng.choice((None, 0, 2, 2.5)), replayed=rng.random() < 0.2, error=error,
        files=files(rng, key) if error is None or rng.random() < 0.1 else (),
        timings=Timings(seconds(rng), seconds(rng), seconds(rng)),
        started_at=timestamp(rng), finished_at=timestamp(rng),
        source=rng.choice((None, f"jobs/{text(rng)}.yaml:12")),
        duplicate_of=rng.choice((None, None, None, rng.randrange(0, index + 1))),
        meta=rng.choice(({}, {"sku": text(rng), "category": text(rng)})),
        reroll_of=reroll_of, attempt=0 if reroll_of is None else rng.randrange(1, 6),
    )


def generated(count: int = 400, *, seed: int = 12) -> Iterator[Result]:
    """``count`` records: ok ones and a failed one of every error category, in turn."""
    rng = random.Random(seed)
    kinds: list[ErrorCategory | None] = [None, *ErrorCategory]
    for index in range(count):
        yield result(rng, index, kinds[index % len(kinds)])


RESULTS = list(generated())


def test_the_generated_records_cover_every_field_and_every_kind() -> None:
    """The generator grows with the record: a field it never sets to anything but its default
    (a field added to Result later) fails here, so (a) and (c) always cover it."""
    for field in dataclasses.fields(Result):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            continue
        assert any(getattr(r, field.name) != default for r in RESULTS), field.name
    assert {r.error.category for r in RESULTS if r.error} == set(ErrorCategory)
    assert {f.check for r in RESULTS for f in r.files} == {"decode", "structure"}
    assert any(r.ok for r in RESULTS) and any(r.timings.total is None for r in RESULTS)


@pytest.mark.parametrize("record", RESULTS, ids=lambda r: f"{r.index}-{r.status}")
def test_every_record_serializes_to_a_schema_valid_line(record: Result) -> None:
    line = record.to_json()
    assert schema_errors(line) == []
    assert Result.from_json(line) == record
    # What the store writes and reads back, through real JSON text.
    assert Result.from_json(json.loads(json.dumps(line, ensure_ascii=False))) == record


# --------------------------------------------------------------------------------------------
# Schema-valid lines parse and round-trip


def example_lines() -> Iterator[tuple[str, dict[str, Any]]]:
    """A line made of the first example of every property, then one line per further example
    of each property (a failed line where the example is an error)."""
    properties = SCHEMA["properties"]
    base = {name: spec["examples"][0] for name, spec in properties.items()}
    base["status"], base["error"] = "ok", None
    base["files"] = properties["files"]["examples"][0]
    yield "first examples", base
    for name, spec in properties.items():
        for number, example in enumerate(spec["examples"]):
            line = {**copy.deepcopy(base), name: copy.deepcopy(example)}
            if name == "error" and example is not None:
                line.update(status="failed", files=[])
            yield f"{name}[{number}]", line


REQUIRED_ONLY = {  # a line of an early run: nothing but the required fields
    "key": "e1a6e93538037b2044e071a16e909321f252c76aa1e73b007ea078e4029d559c", "index": 0,
    "prompt_id": "mug", "status": "ok", "model": "flux-2-dev",
    "prompt": "a red ceramic mug, studio photo", "seed": 42,
    "params": {"aspect_ratio": "1:1", "seed": 42, "output_format": "webp",
               "output_quality": 80, "go_fast": True},
    "job_id": "04fe4849-933b-45ac-bb31-7fe97d52e205", "submission": 0, "jobs": 1,
    "polls": 2, "credit_cost": 2, "error": None,
    "files": [{"path": "images/mug/e1a6e9353803_42_1x1.webp",
               "sha256": "7511d222b27bfdf7170d6c57c8be91d046c8448b3f91f078526a1e3f625b02b1",
               "bytes": 21878, "width": 1024, "height": 1024, "format": "webp"}],
    "timings": {"generating": 2.5, "downloading": 0.2, "total": 2.8},
    "started_at": "2026-11-28T14:41:05.031Z", "finished_at": "2026-11-28T14:41:08.518Z",
}


def variant(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(REQUIRED_ONLY), **changes}


HAND_WRITTEN = {
    "an early run's line, required fields only": REQUIRED_ONLY,
    "before replayed, meta and duplicate_of": variant(template=None, vars={},
                                                      source="jobs/p.yaml:3"),
    "a failed line with no job, no cost and no timings": variant(
        status="failed", job_id=None, jobs=0, credit_cost=None, files=[],
        timings={"generating": None, "downloading": None, "total": None},
        error={"category": "rate_limited", "message": "POST /v2/images/generate: HTTP 429",
               "retryable": True, "http_status": 429}),
    "a lost job": variant(status="failed", files=[], submission=2, error={
        "category": "lost", "message": 'job "j1" unknown', "retryable": True,
        "http_status": 404}),
    "a duplicate of an earlier item, replayed, with meta": variant(
        index=7, duplicate_of=0, replayed=True, meta={"sku": "MUG-001", "note": '"{}"'}),
    "two files checked two ways, custom size, reference images, unicode": variant(
        prompt='a "café" mug {on} oak, "status":"ok"', seed=0,
        params={"aspect_ratio": "custom", "width": 1024, "height": 768, "seed": 0,
                "input_images": ["https://example.com/a.png"]},
        files=[{**REQUIRED_ONLY["files"][0], "check": "structure"},
               {**REQUIRED_ONLY["files"][0], "path": "images/mug/b_2.webp",
                "check": "decode"}]),
    "fields in another order, float cost, integer timings": dict(reversed(variant(
        credit_cost=1.5, timings={"generating": 3, "downloading": 0, "total": 3}).items())),
}


@pytest.mark.parametrize(("line"), [
    *(pytest.param(line, id=f"example {name}") for name, line in example_lines()),
    *(pytest.param(line, id=name) for name, line in HAND_WRITTEN.items()),
])
def test_every_schema_valid_line_parses_and_round_trips(line: dict[str, Any]) -> None:
    assert schema_errors(line) == [], "the test's own line must be schema-valid"
    record = Result.from_json(line)
    assert Result.from_json(record.to_json()) == record
    written = record.to_json()
    assert schema_errors(written) == []
    # Nothing the line said is lost or changed; what it lacked gets its default.
    for name, value in line.items():
        if name == "files":
            assert [{"check": "decode", **f} for f in value] == written["files"]
        elif not (name == "duplicate_of" and value is None):
            assert written[name] == value, name


def test_an_older_lines_missing_fields_get_their_defaults() -> None:
    record = Result.from_json(REQUIRED_ONLY)
    assert (record.replayed, record.meta, record.duplicate_of, record.template, record.vars,
            record.source) == (False, {}, None, None, {}, None)
    assert record.files[0].check == "decode"
    assert "duplicate_of" not in record.to_json()


def test_meta_that_is_not_text_is_read_as_its_json_text() -> None:
    """A hand-edited line's meta value keeps a form a spreadsheet or dataset can use."""
    record = Result.from_json(variant(meta={"n": 5, "tags": ["a", "b"], "sku": "A-1"}))
    assert record.meta == {"n": "5", "tags": '["a", "b"]', "sku": "A-1"}


@pytest.mark.parametrize(("change", "reason"), [
    ({"status": "done"}, "status"),
    ({"key": ""}, "key"),
    ({"index": -1}, "index"),
    ({"error": {"category": "exploded", "message": "x", "retryable": False}}, "category"),
    ({"files": [{"path": "images/a.png", "sha256": "ab"}]}, "files.bytes"),
    ({"files": "images/a.png"}, "files"),
])
def test_a_line_that_is_not_a_result_is_refused_with_its_reason(change: dict[str, Any],
                                                                 reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        Result.from_json(variant(**change))
    with pytest.raises(RecordError):
        Result.from_json(["not", "an", "object"])


# --------------------------------------------------------------------------------------------
# The fast resume pattern


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """The generated records, appended by the store itself (the runner's one writer)."""
    out = tmp_path_factory.mktemp("records") / "out"
    store = RunStore(out, filename_template="{key}.{ext}")
    store.open()
    try:
        for record in RESULTS:
            store.append_result(record)
    finally:
        store.close()
    lines = (out / RESULTS_NAME).read_bytes().split(b"\n")
    assert lines[-1] == b""
    return out, [line + b"\n" for line in lines[:-1]]


def test_the_ok_pattern_matches_exactly_the_ok_lines(
        written: tuple[Path, list[bytes]]) -> None:
    _, lines = written
    assert len(lines) == len(RESULTS)
    for record, line in zip(RESULTS, lines, strict=True):
        found = OK_LINE.match(line)
        if record.ok:
            assert found is not None, line
            assert found.group(1).decode() == record.key[:16]
            files = FILES_FIELD.search(line)
            assert files is not None
            assert json.loads(files.group(1)) == [f.to_json() for f in record.files]
        else:
            assert found is None, line


def test_a_failed_line_whose_strings_say_ok_is_never_taken_for_ok() -> None:
    bait = '","status":"ok","files":[],"timings":{"x":1}}'
    for name in ("prompt_id", "prompt", "model", "template"):
        record = dataclasses.replace(RESULTS[1], **{name: bait})
        assert not record.ok
        line = (json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=False)
                + "\n").encode()
        assert OK_LINE.match(line) is None, name


def test_the_resume_index_reads_them_as_the_records_say(
        written: tuple[Path, list[bytes]]) -> None:
    out, _ = written
    index = ResumeIndex.load(out, check_files=False)  # the lines name no real files
    assert index.bad_lines == []
    ok_keys = {r.key for r in RESULTS if r.ok}
    assert index.ok_count == len(ok_keys)
    for record in RESULTS:
        assert index.is_ok(record.key) == (record.key in ok_keys)
        prior = index.prior_failure(record.key)
        if record.key not in ok_keys:
            assert prior is not None and record.error is not None
            assert (prior.category, prior.retryable, prior.submission, prior.job_id) == (
                record.error.category.value, record.error.retryable, record.submission,
                record.job_id)
