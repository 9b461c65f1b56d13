"""`batchflux plan`: counts, axes, preview, cost, warnings; text and JSON."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

from batchflux.cli import main
from batchflux.manifest import load_job
from batchflux.plan import make_plan, plan_command, validate_command


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def run_plan(path: Path, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    options = {"as_json": True, "limit": 3, "max_items": None, "cost_per_image": None,
               "out_dir": str(path.parent / "out")}
    options.update(kwargs)
    status = plan_command(str(path), out=out, err=err, **options)
    return status, out.getvalue(), err.getvalue()


def test_plan_json_is_one_object_with_counts_axes_preview_and_cost(tmp_path):
    path = write(tmp_path, """\
        grid: {aspect_ratio: ["1:1", "16:9"], seeds: "1-5"}
        prompts: [a fox, a bird]
        run: {cost_per_image: 3}
        """)
    status, out, err = run_plan(path)
    assert status == 0 and err == ""
    plan = json.loads(out)
    assert plan["items"] == 20
    assert plan["axes"] == {"prompts": 2, "aspect_ratio": 2, "seed": 5}
    assert plan["cost_per_image"] == 3 and plan["estimated_cost"] == 60
    assert [p["index"] for p in plan["preview"]] == [0, 1, 2]
    assert plan["preview"][0]["params"]["seed"] == 1
    assert plan["duplicates"] == {"checked": 20, "found": 0}
    assert plan["warnings"] == []


def test_cost_per_image_precedence(tmp_path):
    with_price = write(tmp_path, "prompts: [a]\nrun: {cost_per_image: 5}\n", "a.yaml")
    without = write(tmp_path, "prompts: [a]\n", "b.yaml")
    assert json.loads(run_plan(with_price, cost_per_image=7)[1])["estimated_cost"] == 7
    assert json.loads(run_plan(with_price)[1])["estimated_cost"] == 5
    assert json.loads(run_plan(without)[1])["estimated_cost"] == 2  # DEFAULT_RUN_OPTIONS


def test_duplicate_requests_are_warned(tmp_path):
    path = write(tmp_path, """\
        grid: {seeds: [1, 2]}
        prompts:
          - a fox
          - text: a {animal}
            vars: {animal: [fox, bird]}
        """)
    plan = json.loads(run_plan(path)[1])
    assert plan["items"] == 6 and plan["duplicates"]["found"] == 2
    assert any("duplicate request: item 2 (p0002" in w for w in plan["warnings"])


def test_max_items_override_and_large_grid_warning(tmp_path):
    path = write(tmp_path, "grid: {seeds: '1-60000'}\nprompts: [a, b]\n")
    status, out, err = run_plan(path)
    assert status == 65 and out == ""
    assert "over max_items 100,000" in err
    status, out, _ = run_plan(path, max_items=200_000, limit=0)
    plan = json.loads(out)
    assert status == 0 and plan["items"] == 120_000 and plan["preview"] == []
    assert plan["duplicates"]["checked"] == 50_000
    assert any("covered the first 50,000 of 120,000" in w for w in plan["warnings"])
    assert any("very large grid" in w for w in plan["warnings"])


def test_budget_warning(tmp_path):
    spec = load_job(write(tmp_path, "grid: {repeat: 10}\nprompts: [a]\nrun: {budget: 5}\n"))
    plan = make_plan(spec, limit=1)
    assert plan.estimated_cost == 20
    assert any("over run.budget" in w for w in plan.warnings)


def test_plan_text_output_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory, ./out, does not exist
    path = write(tmp_path, """\
        vars: {c: [red, blue]}
        prompts:
          - text: "a {c} fox"
          - text: a bird
            aspect_ratio: ["1:1", "2:3", "3:2"]
        """)
    assert main(["plan", str(path), "--preview", "2", "--cost-per-image", "1.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 5 items, model flux-2-dev"
    assert out[1] == "axes: prompts 2 x vars.c 2* x aspect_ratio 3*"
    assert out[3] == "run directory out: none yet, every item is to run"
    assert out[4] == "estimated cost: 7.50 credits for 5 items to run (1.5 per image)"
    assert out[6].startswith("  #0 p0001 ") and out[7].strip() == "a red fox"


def test_plan_text_escapes_control_and_format_characters(tmp_path):
    """Issue 10: a prompt with U+202E (right-to-left override), an escape sequence or a
    zero-width space must not reorder or restyle the terminal; --json keeps the exact text."""
    prompt = "a fox \u202eeulb\u202c in \x1b[31mred\x1b[0m snow\u200b"
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"prompts": [prompt], "vars": {}}, ensure_ascii=False),
                    encoding="utf-8")
    status, out, err = run_plan(path, as_json=False)
    assert status == 0 and err == ""
    assert "a fox \\u202eeulb\\u202c in \\u001b[31mred\\u001b[0m snow\\u200b" in out
    assert not any(ch in out for ch in "\u202e\u202c\x1b\u200b")
    status, out, _ = run_plan(path, as_json=True)
    assert json.loads(out)["preview"][0]["prompt"] == prompt


def test_validate_escapes_control_characters_in_diagnostics(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text('prompts:\n  - {text: "x", seed: "\u202e7"}\n', encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    assert validate_command([str(path)], out=out, err=err) == 65
    assert "\\u202e7" in err.getvalue() and "\u202e" not in err.getvalue()
