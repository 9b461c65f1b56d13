"""batchflux review without a browser: the decision file, the HTTP API over real loopback
HTTP, the files it will and will not serve, the command, and what reports and exports make of
the decisions. (The page itself, in Chromium: test_reviewapp_browser.py.)"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from PIL import Image
from runner_helpers import (
    Rerolled,
    load_imagefolder,
    load_results,
    rerolled_run,
    review_run,
)

from batchflux.cli import build_parser, main
from batchflux.dataset import export_dataset
from batchflux.report import build_report
from batchflux.reviewapp import (
    Decision,
    DecisionKind,
    append_decision,
    create_app,
    read_decisions,
)
from batchflux.reviewapp.serve import DEFAULT_PORT, bind_socket
from batchflux.sim import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
REVIEW_SCHEMA = json.loads((ROOT / "schemas" / "review.schema.json").read_text())
SECRET = "not for the review app's visitors"


def review_lines(out: Path) -> list[dict[str, Any]]:
    """Every line of OUT/review.jsonl, each checked against schemas/review.schema.json."""
    raw = (out / "review.jsonl").read_bytes()
    assert raw.endswith(b"\n"), "review.jsonl ends in a torn line"
    validator = jsonschema.Draft202012Validator(REVIEW_SCHEMA,
                                               format_checker=jsonschema.FormatChecker())
    lines = [json.loads(line) for line in raw.splitlines()]
    for line in lines:
        errors = sorted(validator.iter_errors(line), key=str)
        assert not errors, f"review line invalid: {errors[0].message} in {line}"
    return lines


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return review_run(tmp_path_factory.mktemp("reviewapp"))


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run (tests write decisions into it), with a secret file
    beside it that the app must never serve."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (tmp_path / "secret.txt").write_text(SECRET)
    return copy


@pytest.fixture
def served(run: Path) -> Iterator[str]:
    """The review app over ``run`` on a real loopback port."""
    with serve_in_thread(app=create_app(run)) as base_url:
        yield base_url


def ok_records(out: Path) -> list[dict[str, Any]]:
    return [r for r in load_results(out) if r["status"] == "ok"]


# --------------------------------------------------------------------------------------------
# The decision file


def test_each_decision_is_one_schema_valid_line_and_the_last_one_wins(run: Path) -> None:
    a, b, c = (r["key"] for r in ok_records(run)[:3])
    append_decision(run, a, "accept")
    append_decision(run, b, DecisionKind.REJECT, note="the handle is cut off")
    append_decision(run, c, "star")
    append_decision(run, a, "reject")  # changed my mind
    append_decision(run, c, "clear")  # back to undecided
    lines = review_lines(run)
    assert [(line["key"], line["decision"]) for line in lines] == [
        (a, "accept"), (b, "reject"), (c, "star"), (a, "reject"), (c, "clear")]
    assert lines[1]["note"] == "the handle is cut off" and "note" not in lines[0]
    for line in lines:  # UTC, ISO 8601, milliseconds
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert abs(datetime.fromisoformat(line["time"]) - datetime.now(UTC)).total_seconds() < 60

    decisions = read_decisions(run)
    assert set(decisions) == {a, b}  # c was cleared
    assert decisions[a].decision is DecisionKind.REJECT and decisions[a].state == "rejected"
    assert decisions[b] == Decision(b, DecisionKind.REJECT, decisions[b].time,
                                    "the handle is cut off")
    with pytest.raises(dataclasses.FrozenInstanceError):
        decisions[a].decision = DecisionKind.ACCEPT  # type: ignore[misc]
    with pytest.raises(ValueError):
        append_decision(run, a, "maybe")
    assert len(review_lines(run)) == 5


def test_a_torn_line_is_skipped_and_closed_off_by_the_next_append(run: Path) -> None:
    a, b = (r["key"] for r in ok_records(run)[:2])
    append_decision(run, a, "accept")
    with open(run / "review.jsonl", "ab") as fh:
        fh.write(b'{"key": "' + b.encode() + b'", "decis')  # a writer died mid-line
    assert set(read_decisions(run)) == {a}
    append_decision(run, b, "star")
    raw = (run / "review.jsonl").read_bytes().splitlines()
    assert len(raw) == 3 and json.loads(raw[-1])["key"] == b
    assert {k: d.state for k, d in read_decisions(run).items()} == {a: "accepted",
                                                                    b: "starred"}


def test_an_append_waits_for_the_file_lock_another_process_holds(run: Path) -> None:
    key = ok_records(run)[0]["key"]
    path = run / "review.jsonl"
    holder = os.open(path, os.O_RDWR | os.O_CREAT)  # its own open file: a lock of its own
    fcntl.flock(holder, fcntl.LOCK_EX)
    writer = threading.Thread(target=append_decision, args=(run, key, "accept"))
    try:
        writer.start()
        writer.join(0.5)
        assert writer.is_alive(), "append_decision did not wait for the flock"
        assert path.read_bytes() == b""
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    writer.join(10)
    assert not writer.is_alive()
    assert [line["decision"] for line in review_lines(run)] == ["accept"]


APPENDER = """
import sys, threading
from batchflux.reviewapp import append_decision
out, key, tag = sys.argv[1], sys.argv[2], sys.argv[3]
note = "\u00e9\u6f22\U0001f600" * 600  # multi-byte text: lines of ~5 KB
done = []
def work(n):
    for i in range(60):
        append_decision(out, key, ("accept", "reject", "star")[i % 3], note=f"{tag}{n}:{i} {note}")
    done.append(n)
threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
sys.exit(0 if len(done) == 3 else 1)
"""


def test_two_processes_with_three_threads_each_never_tear_a_line(run: Path) -> None:
    key = ok_records(run)[0]["key"]
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(run), key, tag])
             for tag in ("first", "second")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = review_lines(run)  # every line parses and validates
    assert len(lines) == 2 * 3 * 60
    tags = {line["note"].split(" ")[0] for line in lines}
    assert len(tags) == 2 * 3 * 60  # every append landed exactly once


def test_the_schema_ships_in_the_package_and_pyproject_ships_the_app_assets() -> None:
    assert (ROOT / "batchflux" / "schemas" / "review.schema.json").is_file()
    assert REVIEW_SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(REVIEW_SCHEMA)
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["batchflux"]
    package = ROOT / "batchflux"
    shipped = [p.relative_to(package).as_posix() for p in
               [*(package / "reviewapp" / "static").iterdir(),
                package / "schemas" / "review.schema.json"]]
    assert {"reviewapp/static/index.html", "reviewapp/static/app.js",
            "reviewapp/static/app.css"} <= set(shipped)
    for rel in shipped:
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data"


# --------------------------------------------------------------------------------------------
# The HTTP API, over real HTTP on loopback


def test_the_page_and_its_assets_are_served_and_need_nothing_external(served: str) -> None:
    page = httpx.get(served + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert set(refs) >= {"/static/app.js", "/static/app.css"}
    for ref in refs:
        assert not re.match(r"(https?:)?//", ref), ref
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = httpx.get(f"{served}/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert not re.search(r"https?://", asset.text), f"{name} refers to the network"
    assert httpx.get(served + "/static/decisions.py").status_code == 404


def test_the_run_is_described_with_params_once_per_prompt(served: str, run: Path) -> None:
    data = httpx.get(served + "/api/run").json()
    records = {r["key"]: r for r in load_results(run)}
    assert {item["key"] for item in data["items"]} == set(records)
    assert [g["prompt_id"] for g in data["groups"]] == ["mug", "vase"]
    for group in data["groups"]:
        common = dict(group["common"])
        assert common["output_quality"] == "90" and "seed" not in common
    assert data["axes"] == {"seed": ["1", "2", "3"], "aspect": ["1:1", "16:9"]}
    for item in data["items"]:
        record = records[item["key"]]
        assert item["varying"] == []  # everything but seed and aspect is common here
        assert item["label"].startswith(f"seed {record['seed']} · ")
        if record["status"] == "ok":
            assert not item["failed"] and item["error"] is None
            assert item["images"][0]["thumb"] == f"/thumbs/{item['key']}/1"
        else:
            assert item["failed"] and item["images"] == []
            assert item["error"]["category"] == record["error"]["category"]
            assert item["error"]["message"] == record["error"]["message"]
    assert data["decisions"] == {}


def test_a_decision_is_appended_at_once_and_read_back(served: str, run: Path) -> None:
    key = ok_records(run)[0]["key"]
    answer = httpx.post(served + "/api/decisions", json={"key": key, "decision": "star",
                                                         "note": "hero shot"})
    assert answer.status_code == 200
    (line,) = review_lines(run)  # on disk before the answer came back
    assert answer.json() == line
    assert line["key"] == key and line["decision"] == "star" and line["note"] == "hero shot"
    assert httpx.get(served + "/api/decisions").json() == {key: line}
    assert httpx.get(served + "/api/run").json()["decisions"] == {key: line}


@pytest.mark.parametrize("body, why", [
    ({"key": "0" * 64, "decision": "accept"}, "not an item of this run"),
    ({"key": "../../etc/passwd", "decision": "accept"}, "not an item of this run"),
    ({"decision": "accept"}, "not an item of this run"),
    ({"key": "OK", "decision": "maybe"}, "decision must be one of"),
    ({"key": "OK", "decision": "accept", "note": 7}, "note must be text"),
    ({"key": "FAILED", "decision": "accept"}, "no image to decide on"),
    (["not", "an", "object"], "JSON object"),
])
def test_a_bad_decision_is_refused_with_400_and_writes_nothing(served: str, run: Path,
                                                               body: Any, why: str) -> None:
    records = load_results(run)
    keys = {"OK": next(r["key"] for r in records if r["status"] == "ok"),
            "FAILED": next(r["key"] for r in records if r["status"] != "ok")}
    if isinstance(body, dict) and body.get("key") in keys:
        body = {**body, "key": keys[body["key"]]}
    answer = httpx.post(served + "/api/decisions", json=body)
    assert answer.status_code == 400 and why in answer.json()["error"]
    assert not (run / "review.jsonl").exists()


def test_decisions_only_from_this_apps_own_page(served: str, run: Path) -> None:
    key = ok_records(run)[0]["key"]
    body = json.dumps({"key": key, "decision": "accept"})
    assert httpx.post(served + "/api/decisions", content=body,
                      headers={"Content-Type": "text/plain"}).status_code == 415
    assert httpx.post(served + "/api/decisions", content=body,
                      headers={"Content-Type": "application/json",
                               "Origin": "http://evil.example"}).status_code == 403
    # A DNS name that points at 127.0.0.1 (rebinding) is not this app.
    assert httpx.get(served + "/api/run", headers={"Host": "evil.example"}).status_code == 400
    assert not (run / "review.jsonl").exists()


def raw_get(base_url: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client-side normalisation of ``..``)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize("target", [
    "/files/..%2fsecret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/%2e%2e%2fsecret.txt",
    "/files/images/../../secret.txt",
    "/files/images/%2e%2e/%2e%2e/secret.txt",
    "/files//etc/passwd",
    "/files/%2Fetc%2Fpasswd",
    "/files/results.jsonl",  # inside the run, but not an image the results list
    "/files/.batchflux/journal.jsonl",
    "/static/..%2f..%2f..%2f..%2fsecret.txt",
    "/static/..%2fdecisions.py",
    "/thumbs/..%2fsecret.txt/1",
    "/..%2fsecret.txt",
    "/../secret.txt",
])
def test_path_traversal_is_refused(served: str, target: str) -> None:
    status, data = raw_get(served, target)
    assert status in (400, 404), (target, status)
    assert SECRET.encode() not in data and b"root:" not in data


def test_symlinks_that_lead_outside_the_run_are_refused(served: str, run: Path) -> None:
    record = ok_records(run)[0]
    listed = run / record["files"][0]["path"]
    listed.unlink()
    listed.symlink_to(run.parent / "secret.txt")  # a listed image, now pointing outside
    (run / "images" / "escape.png").symlink_to(run.parent / "secret.txt")
    for target in (f"/files/{record['files'][0]['path']}", "/files/images/escape.png",
                   f"/thumbs/{record['key']}/1"):
        status, data = raw_get(served, target)
        assert status == 404, target
        assert SECRET.encode() not in data


def test_full_images_are_served_byte_for_byte(served: str, run: Path) -> None:
    for record in ok_records(run)[:3]:
        f = record["files"][0]
        answer = httpx.get(f"{served}/files/{f['path']}")
        assert answer.status_code == 200
        assert hashlib.sha256(answer.content).hexdigest() == f["sha256"]


def test_thumbnails_are_made_once_and_cached_in_the_run(served: str, run: Path) -> None:
    record = ok_records(run)[0]
    first = httpx.get(f"{served}/thumbs/{record['key']}/1")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(first.content)) as im:
        assert im.format == "JPEG" and max(im.size) == 256
        f = record["files"][0]
        assert abs(im.size[0] / im.size[1] - f["width"] / f["height"]) < 0.02
    cached = run / "review" / "thumbs" / f"{record['key'][:32]}.jpg"
    assert cached.read_bytes() == first.content
    made = cached.stat().st_mtime_ns
    time.sleep(0.05)
    assert httpx.get(f"{served}/thumbs/{record['key']}/1").content == first.content
    assert cached.stat().st_mtime_ns == made  # not made again
    assert httpx.get(f"{served}/thumbs/{record['key']}/2").status_code == 404


def test_items_a_resumed_run_adds_meanwhile_appear_without_a_restart(served: str,
                                                                     run: Path) -> None:
    from array import array

    from batchflux.store import key_id, read_item_keys, save_item_keys

    before = httpx.get(served + "/api/run").json()["run"]["items"]
    extra = {**ok_records(run)[0], "key": "f" * 64}
    # The run records its manifest's items before it runs them (issue 13.5): the new item is
    # one of them.
    keys = read_item_keys(run)
    assert keys is not None
    save_item_keys(run, array("Q", sorted([*keys, key_id(extra["key"])])))
    with open(run / "results.jsonl", "a") as fh:
        fh.write(json.dumps(extra) + "\n")
    assert httpx.get(served + "/api/run").json()["run"]["items"] == before + 1
    assert httpx.post(served + "/api/decisions",
                      json={"key": "f" * 64, "decision": "accept"}).status_code == 200


# --------------------------------------------------------------------------------------------
# Rerolls (run --reroll rejected) in the app


@pytest.fixture(scope="module")
def rerolled(finished: Path, tmp_path_factory: pytest.TempPathFactory) -> Rerolled:
    return rerolled_run(finished, tmp_path_factory.mktemp("reviewapp-rerolled"))


def test_a_reroll_comes_right_after_its_original_labelled_in_its_cells(
        rerolled: Rerolled) -> None:
    records = {r["key"]: r for r in load_results(rerolled.out)}
    with serve_in_thread(app=create_app(rerolled.out)) as served:
        data = httpx.get(served + "/api/run").json()
    keys = [item["key"] for item in data["items"]]
    assert sorted(keys) == sorted(records)
    items = {item["key"]: item for item in data["items"]}
    for original, chain in rerolled.rerolls.items():
        at = keys.index(original)
        assert keys[at:at + 1 + len(chain)] == [original, *chain]  # by attempt, right after
        head = records[original]
        short = f"seed {head['seed']} · {head['params']['aspect_ratio']}"
        for attempt, key in enumerate(chain, start=1):
            item = items[key]
            assert (item["reroll_of"], item["attempt"]) == (original, attempt)
            assert item["reroll"] == f"reroll {attempt} of {short}"
            assert item["label"].startswith(f"seed {records[key]['seed']} · ")  # its own seed
            # In the grids it sits in its original's cell, not in a column of its own seed.
            assert (item["group"], item["seed"], item["aspect"]) == (
                items[original]["group"], items[original]["seed"], items[original]["aspect"])
            assert records[key]["seed"] != head["seed"]
    for key, item in items.items():
        if not records[key].get("reroll_of"):
            assert (item["reroll_of"], item["attempt"], item["reroll"]) == (None, 0, None)
    assert data["axes"] == {"seed": ["1", "2", "3"], "aspect": ["1:1", "16:9"]}


def test_a_reroll_is_accepted_or_rejected_like_any_image(rerolled: Rerolled,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(rerolled.out, run)
    second_try, third_try = rerolled.rerolls[rerolled.first]
    (other,) = rerolled.rerolls[rerolled.second]
    with serve_in_thread(app=create_app(run)) as served:
        for key, decision in ((third_try, "accept"), (other, "reject"), (other, "star")):
            answer = httpx.post(served + "/api/decisions", json={"key": key,
                                                                 "decision": decision})
            assert answer.status_code == 200, answer.text
        decisions = httpx.get(served + "/api/run").json()["decisions"]
    assert {k: d["decision"] for k, d in decisions.items()} == {
        rerolled.first: "reject", rerolled.second: "reject", second_try: "reject",
        third_try: "accept", other: "star"}
    assert [(line["key"], line["decision"]) for line in review_lines(run)][-3:] == [
        (third_try, "accept"), (other, "reject"), (other, "star")]
    assert read_decisions(run)[third_try].state == "accepted"


def test_export_only_takes_a_reroll_by_its_own_state(rerolled: Rerolled, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(rerolled.out, run)
    second_try, third_try = rerolled.rerolls[rerolled.first]
    (other,) = rerolled.rerolls[rerolled.second]
    append_decision(run, third_try, "accept")
    append_decision(run, other, "star")

    def exported(state: str) -> list[str]:
        done = export_dataset(run, "hf", only=(state,))
        rows = [json.loads(line) for line in
                (done.path / "train" / "metadata.jsonl").read_text().splitlines()]
        assert {row["decision"] for row in rows} == {state}
        return sorted(row["key"] for row in rows)

    assert exported("accepted") == [third_try]
    assert exported("starred") == [other]
    assert exported("rejected") == sorted([rerolled.first, rerolled.second, second_try])
    decided = {rerolled.first, rerolled.second, second_try, third_try, other}
    assert exported("undecided") == sorted(r["key"] for r in ok_records(run)
                                           if r["key"] not in decided)


# --------------------------------------------------------------------------------------------
# The command


def test_review_command_prints_its_url_opens_it_serves_and_stops_on_ctrl_c(
        run: Path, tmp_path: Path) -> None:
    opened = tmp_path / "opened.txt"
    # webbrowser runs $BROWSER with the URL in place of %s: here, a script that notes it.
    browser = (f"{shlex.quote(sys.executable)} -c "
               "'import sys; open(sys.argv[1], \"w\").write(sys.argv[2])' "
               f"{shlex.quote(str(opened))} %s")
    proc = subprocess.Popen([sys.executable, "-m", "batchflux", "review", str(run), "--port",
                             "0", "--open"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "BROWSER": browser})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:(\d+)/)", line)
        assert match and int(match.group(2)) != 0, line
        assert str(run / "review.jsonl") in line
        for _ in range(200):
            try:
                answer = httpx.get(match.group(1) + "api/run", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert answer.status_code == 200 and answer.json()["run"]["items"] == 12
        for _ in range(200):
            if opened.exists() and opened.read_text():
                break
            time.sleep(0.05)
        assert opened.read_text() == match.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read() if proc.stderr else ""


def test_a_taken_port_is_a_clear_error_with_exit_75(run: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["review", str(run), "--port", str(port)]) == 75
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err and "--port 0" in err


def test_without_a_port_the_default_is_used_or_else_a_free_one() -> None:
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", DEFAULT_PORT))
        blocker.listen()
    except OSError:
        pass  # something else already holds it: the fallback is tested all the same
    try:
        sock = bind_socket("127.0.0.1", None)
        port = sock.getsockname()[1]
        sock.close()
        assert port not in (0, DEFAULT_PORT)
    finally:
        blocker.close()


def test_review_of_something_else_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["review", str(tmp_path), "--port", "0"]) == 2


# --------------------------------------------------------------------------------------------
# Reports and exports read the decisions


def decide_some(run: Path) -> dict[str, list[str]]:
    ok = [r["key"] for r in ok_records(run)]
    chosen = {"accepted": ok[0:3], "rejected": ok[3:5], "starred": ok[5:6]}
    for key in ok[0:3]:
        append_decision(run, key, "accept")
    for key in ok[3:5]:
        append_decision(run, key, "reject")
    append_decision(run, ok[5], "accept")
    append_decision(run, ok[5], "star")  # the last line wins
    append_decision(run, ok[6], "reject")
    append_decision(run, ok[6], "clear")
    chosen["undecided"] = ok[6:]
    return chosen


def test_report_json_counts_the_decisions(run: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert build_report(run)["decisions"] == {"accepted": 0, "rejected": 0, "starred": 0,
                                              "undecided": len(ok_records(run))}
    chosen = decide_some(run)
    assert main(["report", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decisions"] == {state: len(keys) for state, keys in chosen.items()}
    assert main(["report", str(run)]) == 0
    assert "review decisions" in capsys.readouterr().out


def test_export_only_accepted_loads_with_datasets_with_exactly_those_rows(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chosen = decide_some(run)
    assert main(["export", str(run), "--dataset", "hf", "--only", "accepted"]) == 0
    assert "3 images (accepted only)" in capsys.readouterr().out
    loaded = load_imagefolder(run / "dataset" / "hf", tmp_path)
    assert sorted(row["key"] for row in loaded["rows"]) == sorted(chosen["accepted"])
    assert {row["decision"] for row in loaded["rows"]} == {"accepted"}
    records = {r["key"]: r for r in load_results(run)}
    for row in loaded["rows"]:
        assert row["size"] == [records[row["key"]]["files"][0]["width"],
                               records[row["key"]]["files"][0]["height"]]


def test_export_only_takes_several_states_and_webdataset_too(run: Path) -> None:
    chosen = decide_some(run)
    done = export_dataset(run, "webdataset", only=("accepted", "starred"))
    assert done.rows == len(chosen["accepted"]) + len(chosen["starred"])
    done = export_dataset(run, "hf", only=("undecided",))
    rows = [json.loads(line) for line in
            (done.path / "train" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == sorted(chosen["undecided"])


def test_export_only_with_nothing_chosen_refuses_and_keeps_the_old_export(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run), "--dataset", "hf"]) == 0
    before = (run / "dataset" / "hf" / "train" / "metadata.jsonl").read_text()
    assert main(["export", str(run), "--dataset", "hf", "--only", "starred"]) == 2
    assert "nothing to export: no image is starred" in capsys.readouterr().err
    assert (run / "dataset" / "hf" / "train" / "metadata.jsonl").read_text() == before
    assert main(["export", str(run), "--dataset", "hf", "--only", "kept"]) == 2


# --------------------------------------------------------------------------------------------
# The examples in README.md and docs/review.md


def test_the_review_examples_in_the_readme_and_docs_work(run: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Reviewing a run"):readme.index("## Datasets")]
    docs = (ROOT / "docs" / "review.md").read_text()
    commands = [shlex.split(line, comments=True)
                for text in (section, docs)
                for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
                for line in block.splitlines() if line.startswith("batchflux ")]
    chosen = decide_some(run)
    seen = set()
    for command in commands:
        args = [str(run) if arg == "out/product-photos" else arg for arg in command[1:]]
        seen.add(args[0])
        # A 20 s run, a server, and a plan of the example manifest: their flags must parse
        # (test_cron_readme.py runs them, the plan --reroll line included, on the example).
        if args[0] in ("run", "review", "plan"):
            build_parser().parse_args(args)
        else:
            assert main(args) == 0, command
    assert seen == {"run", "review", "plan", "export", "report", "verify"}
    assert "review decisions" in capsys.readouterr().out

    validator = jsonschema.Draft202012Validator(REVIEW_SCHEMA,
                                               format_checker=jsonschema.FormatChecker())
    (example,) = re.findall(r"```json\n(.*?)```", docs, re.DOTALL)
    for line in example.splitlines():
        validator.validate(json.loads(line))

    (code,) = re.findall(r"```python\n(.*?)```", docs, re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(code.replace('"out/product-photos"', repr(str(run))), namespace)
    assert sorted(namespace["accepted"]) == sorted(chosen["accepted"])
