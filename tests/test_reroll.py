"""Reroll (issue 15): a new image for each rejected one, paid exactly once per rejection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runner_helpers import check_run_directory, inprocess, load_results, write_manifest

from batchflux import batch
from batchflux.cli import main
from batchflux.models import Result, RunOptions
from batchflux.reroll import reroll_seed
from batchflux.review import axis_value, axis_values, chain_order, prompt_groups, reroll_label
from batchflux.reviewapp.decisions import append_decision
from batchflux.sim import SimSettings, create_app

FAST = SimSettings(job_seconds=0.1, queue_seconds=0.0, render_mode="fast", credits=100_000)


async def test_reroll_pays_once_per_rejected_image_and_chains(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=2, aspects=("1:1",))  # 4 items
    out = tmp_path / "out"
    app = create_app(FAST)
    target = inprocess(app)

    def jobs() -> int:
        return int(app.state.sim.counters.jobs_created)

    await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=target)
    originals = {r["key"]: r for r in load_results(out)}
    rejected = sorted(originals)[:2]
    for key in rejected:
        append_decision(out, key, "reject")
    append_decision(out, sorted(originals)[2], "accept")

    # plan shows the count and the cost first, and spends nothing.
    assert main(["plan", str(manifest), "--out", str(out), "--reroll", "rejected",
                 "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert (planned["rerolls"], planned["to_run"], planned["estimated_cost"]) == (2, 2, 4.0)
    assert main(["plan", str(manifest), "--out", str(out), "--reroll", "rejected"]) == 0
    text = capsys.readouterr().out
    assert "reroll rejected: 2 new images for the rejected ones, 4.00 credits" in text
    assert text.index("reroll rejected:") < text.index("estimated cost: 4.00 credits")
    assert jobs() == 4

    reroll = RunOptions(out_dir=out, reroll="rejected")
    result = await batch.run_batch_async(manifest, reroll, target=target)
    assert result.exit_code == 0 and jobs() == 4 + 2
    rerolls = [r for r in load_results(out) if r.get("reroll_of")]
    assert sorted(r["reroll_of"] for r in rerolls) == rejected
    for record in rerolls:
        original = originals[record["reroll_of"]]
        assert record["attempt"] == 1 and record["status"] == "ok"
        assert record["prompt"] == original["prompt"]
        assert record["prompt_id"] == original["prompt_id"]
        assert record["seed"] == reroll_seed(original["key"], 1) != original["seed"]
        assert record["key"] != original["key"] and record["index"] >= 4
    check_run_directory(out, expected_items=6)

    again = await batch.run_batch_async(manifest, reroll, target=target)
    assert again.exit_code == 0 and jobs() == 6  # the same rerolls again: nothing new to pay

    # The first reroll of the first rejected item is rejected in turn: attempt 2 of it.
    first = next(r for r in rerolls if r["reroll_of"] == rejected[0])
    append_decision(out, first["key"], "reject")
    await batch.run_batch_async(manifest, reroll, target=target)
    assert jobs() == 7
    second = [r for r in load_results(out) if r.get("reroll_of") == rejected[0]
              and r.get("attempt") == 2]
    assert len(second) == 1 and second[0]["seed"] == reroll_seed(rejected[0], 2)
    # Without --reroll, the run is the manifest alone: nothing to do, nothing paid.
    plain = await batch.run_batch_async(manifest, RunOptions(out_dir=out), target=target)
    assert plain.exit_code == 0 and jobs() == 7


def record(name: str, index: int, seed: int, *, prompt: str = "mug", aspect: str = "1:1",
           reroll_of: str | None = None, attempt: int = 0) -> Result:
    """A result line as the review reads it, keyed by ``name``."""
    return Result(key=name.ljust(64, "0"), index=index, prompt_id=prompt, status="ok",
                  model="flux-2-dev", prompt=f"a {prompt}", seed=seed,
                  params={"seed": seed, "aspect_ratio": aspect}, reroll_of=reroll_of,
                  attempt=attempt)


def test_the_review_puts_each_reroll_right_after_its_original_by_attempt() -> None:
    a, b, c = record("a", 0, 1), record("b", 1, 2, aspect="16:9"), record("c", 2, 1, prompt="vase")
    # Indexes as a second reroll hands them out: the chains made so far, then the new attempt.
    a1 = record("a1", 3, 9001, reroll_of=a.key, attempt=1)
    b1 = record("b1", 4, 9002, aspect="16:9", reroll_of=b.key, attempt=1)
    a2 = record("a2", 4, 9003, reroll_of=a.key, attempt=2)
    c1 = record("c1", 5, 9004, prompt="vase", reroll_of=c.key, attempt=1)
    orphan = record("o1", 6, 9005, reroll_of="gone".ljust(64, "0"), attempt=1)
    ordered = chain_order([a, b, c, a2, a1, orphan, b1, c1])
    assert [r.key[:2].rstrip("0") for r in ordered] == ["a", "a1", "a2", "b", "b1", "c", "c1",
                                                         "o1"]
    groups = prompt_groups([a, b, c, a2, a1, orphan, b1, c1])
    assert [[r.key[:2].rstrip("0") for r in g.records] for g in groups] == [
        ["a", "a1", "a2", "b", "b1", "o1"], ["c", "c1"]]

    by_key = {r.key: r for r in ordered}
    assert reroll_label(a2, by_key) == "reroll 2 of seed 1 · 1:1"
    assert reroll_label(b1, by_key) == "reroll 1 of seed 2 · 16:9"
    assert reroll_label(orphan, by_key) == "reroll 1 of gone00000000"
    assert reroll_label(a, by_key) is None
    # In the grids a reroll takes its original's column (an orphan keeps its own).
    assert [axis_value(r, "seed", by_key) for r in (a1, a2, b1, orphan)] == [
        "1", "1", "2", "9005"]
    assert axis_value(a1, "seed") == "9001"  # without the run's records: its own seed
    assert axis_values(ordered, "seed", by_key) == ["1", "2", "9005"]
    assert axis_values(ordered, "aspect", by_key) == ["1:1", "16:9"]
