"""Item metadata (issue 13, point 7): extra CSV/TSV columns, and ``meta`` on JSONL lines and
YAML entries, reach every item as ``WorkItem.meta`` without changing any item's key."""

from __future__ import annotations

import io
import json
import re
import textwrap
from pathlib import Path

import pytest

from batchflux.errors import ManifestError
from batchflux.expand import expand_job
from batchflux.manifest import load_job
from batchflux.models import WorkItem
from batchflux.plan import plan_command

CATALOGUE = (
    "sku,caption,category\n"
    "MUG-001,a red ceramic mug on an oak table,kitchen\n"
    "SNK-002,  a white canvas sneaker on concrete  , shoes \n"
    "VAS-003,a blue glass vase on linen\n"  # a short row: no category cell
)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def items(path: Path) -> list[WorkItem]:
    return list(expand_job(load_job(path)))


def diagnostics(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_job(path)
    return [str(d) for d in info.value.diagnostics]


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    (tmp_path / "catalogue.csv").write_text(CATALOGUE, encoding="utf-8")
    return tmp_path


def test_a_catalogue_csv_carries_sku_and_category_into_every_item(catalogue: Path) -> None:
    path = write(catalogue, """\
        grid: {seeds: [1, 2]}
        prompts_file:
          path: catalogue.csv
          text_column: caption
          id_column: sku
          meta_columns: [sku, category]
        """)
    got = [(i.prompt_id, i.seed, i.prompt, dict(i.meta)) for i in items(path)]
    mug, sneaker, vase = ("a red ceramic mug on an oak table", "a white canvas sneaker on concrete",
                          "a blue glass vase on linen")
    assert got == [
        ("MUG-001", 1, mug, {"sku": "MUG-001", "category": "kitchen"}),
        ("MUG-001", 2, mug, {"sku": "MUG-001", "category": "kitchen"}),
        # cells are trimmed, the prompt's and the meta's alike
        ("SNK-002", 1, sneaker, {"sku": "SNK-002", "category": "shoes"}),
        ("SNK-002", 2, sneaker, {"sku": "SNK-002", "category": "shoes"}),
        # a short row's missing cell is empty text, so every item has every meta column
        ("VAS-003", 1, vase, {"sku": "VAS-003", "category": ""}),
        ("VAS-003", 2, vase, {"sku": "VAS-003", "category": ""}),
    ]
    assert all("sku" not in i.params and "category" not in i.params for i in items(path))


def test_meta_columns_all_takes_every_named_column_but_the_prompt(catalogue: Path) -> None:
    path = write(catalogue, "prompts_file: {path: catalogue.csv, text_column: caption, "
                            "meta_columns: all}\n")
    first = items(path)[0]
    assert list(first.meta) == ["sku", "category"]
    assert first.prompt_id == "p0001"  # meta does not make an id column


def test_metadata_is_not_part_of_the_request_so_keys_do_not_change(catalogue: Path) -> None:
    plain = write(catalogue, "prompts_file: {path: catalogue.csv, text_column: caption, "
                             "id_column: sku}\n", name="plain.yaml")
    with_meta = write(catalogue, "prompts_file: {path: catalogue.csv, text_column: caption, "
                                 "id_column: sku, meta_columns: [sku, category]}\n",
                      name="meta.yaml")
    without, carrying = items(plain), items(with_meta)
    assert [i.meta for i in without] == [{}, {}, {}]
    assert all(i.meta for i in carrying)
    assert [(i.key, i.params) for i in without] == [(i.key, i.params) for i in carrying]
    (catalogue / "a.jsonl").write_text('{"prompt": "a red fox"}\n', encoding="utf-8")
    (catalogue / "b.jsonl").write_text('{"prompt": "a red fox", "meta": {"sku": "FOX-1"}}\n',
                                       encoding="utf-8")
    (a,), (b,) = items(catalogue / "a.jsonl"), items(catalogue / "b.jsonl")
    assert b.meta == {"sku": "FOX-1"} and a.meta == {}
    assert a.key == b.key


def test_a_jsonl_line_and_a_yaml_entry_carry_their_own_meta(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text(
        '{"id": "fox", "prompt": "a fox", "seeds": [1, 2], "meta": {"source": "wiki", '
        '"licence": "CC-BY"}}\n{"id": "owl", "prompt": "an owl"}\n', encoding="utf-8")
    got = [(i.prompt_id, dict(i.meta)) for i in items(tmp_path / "items.jsonl")]
    assert got == [("fox", {"source": "wiki", "licence": "CC-BY"}),
                   ("fox", {"source": "wiki", "licence": "CC-BY"}), ("owl", {})]
    path = write(tmp_path, """\
        prompts:
          - id: mug
            text: "a {color} mug"
            vars: {color: [red, blue]}
            meta: {sku: "0042", line: kitchen}
          - a plain prompt
        """)
    got = [(i.prompt, dict(i.meta)) for i in items(path)]
    assert got == [("a red mug", {"sku": "0042", "line": "kitchen"}),
                   ("a blue mug", {"sku": "0042", "line": "kitchen"}), ("a plain prompt", {})]


def test_an_unknown_meta_column_is_refused_at_its_name(catalogue: Path) -> None:
    path = write(catalogue, """\
        prompts_file:
          path: catalogue.csv
          text_column: caption
          meta_columns: [sku, colour]
        """)
    assert diagnostics(path) == [
        (f"{path}:4:23: prompts_file.meta_columns[1]: no column 'colour' in "
        f"{catalogue}/catalogue.csv (columns: sku, caption, category)")]


def test_a_meta_column_whose_header_repeats_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("text,tag,tag\na fox,a,b\n", encoding="utf-8")
    path = write(tmp_path, "prompts_file: {path: p.csv, text_column: text, meta_columns: all}\n")
    assert diagnostics(path) == [
        (f"{path}:1:62: prompts_file.meta_columns: column 'tag' appears 2 times in the header "
        f"of {tmp_path}/p.csv: a meta column needs a header of its own")]


@pytest.mark.parametrize(("spec", "message"), [
    ("meta_columns: sku", ('invalid meta_columns "sku": give a list of column headers '
                          '([sku, category]) or "all"')),
    ("meta_columns: [sku, sku]", 'lists "sku" more than once'),
    ("meta_columns: []", "must not be an empty list"),
])
def test_a_malformed_meta_columns_is_refused_with_the_reason(catalogue: Path, spec: str,
                                                             message: str) -> None:
    path = write(catalogue, f"prompts_file: {{path: catalogue.csv, text_column: caption, "
                            f"{spec}}}\n")
    (line,) = diagnostics(path)
    assert line == f"{path}:1:73: prompts_file.meta_columns: {message}"


def test_meta_columns_on_a_jsonl_prompts_file_points_at_the_line_s_own_meta(
        tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text('{"prompt": "a fox"}\n', encoding="utf-8")
    path = write(tmp_path, "prompts_file: {path: items.jsonl, meta_columns: all}\n")
    assert diagnostics(path) == [
        (f'{path}:1:35: prompts_file.meta_columns: meta_columns is for CSV/TSV files '
        '(a JSONL item carries its own "meta")')]


def test_meta_values_are_text_and_names_are_not_empty(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        prompts:
          - {text: a mug, meta: {sku: 42}}
          - {text: a cup, meta: {"": x}}
        """)
    assert diagnostics(path) == [
        f"{path}:2:31: prompts[0].meta.sku: expected string, got integer 42",
        f"{path}:3:26: prompts[1].meta.: a name must not be empty"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a fox", "meta": {"sku": 5}}\n',
                                        encoding="utf-8")
    assert diagnostics(tmp_path / "bad.jsonl") == [
        f"{tmp_path}/bad.jsonl:1:37: meta.sku: expected string, got integer 5"]


def test_plan_shows_each_preview_item_s_meta(catalogue: Path) -> None:
    path = write(catalogue, "prompts_file: {path: catalogue.csv, text_column: caption, "
                            "meta_columns: [sku]}\n")
    out, err = io.StringIO(), io.StringIO()
    assert plan_command(str(path), as_json=True, limit=2, max_items=None, cost_per_image=None,
                        out=out, err=err) == 0
    assert [p["meta"] for p in json.loads(out.getvalue())["preview"]] == [
        {"sku": "MUG-001"}, {"sku": "SNK-002"}]
    out = io.StringIO()
    assert plan_command(str(path), as_json=False, limit=1, max_items=None, cost_per_image=None,
                        out=out, err=err) == 0
    assert "      meta: sku=MUG-001\n" in out.getvalue()


def test_the_catalogue_example_in_the_docs_loads_as_described(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "manifest.md").read_text()
    (csv_text,) = re.findall(r"```csv\n(.*?)```", doc, re.DOTALL)
    yaml_text = re.search(r"<!-- docs:meta-example -->\s*```yaml\n(.*?)```", doc, re.DOTALL)
    assert yaml_text is not None
    (tmp_path / "catalogue.csv").write_text(csv_text, encoding="utf-8")
    got = items(write(tmp_path, yaml_text.group(1)))
    assert len(got) == 4
    assert {i.prompt_id: dict(i.meta) for i in got} == {
        "MUG-001": {"sku": "MUG-001", "category": "kitchen"},
        "SNK-002": {"sku": "SNK-002", "category": "shoes"}}


def test_rows_that_differ_only_in_meta_are_flagged_as_the_same_requests(tmp_path: Path) -> None:
    """The docs promise: metadata is not requested, so plan warns these are generated once."""
    (tmp_path / "c.csv").write_text("sku,caption\nA-1,a red mug\nA-2,a red mug\n",
                                    encoding="utf-8")
    spec = load_job(write(tmp_path, "prompts_file: {path: c.csv, text_column: caption, "
                                    "id_column: sku, meta_columns: [sku]}\n"))
    (warning,) = spec.warnings
    assert warning.field == "A-2" and "same requests as A-1" in warning.message
    first, second = expand_job(spec)
    assert first.key == second.key and (first.meta, second.meta) == ({"sku": "A-1"},
                                                                     {"sku": "A-2"})


async def test_a_run_writes_each_items_meta_on_its_result_line(tmp_path: Path) -> None:
    """The CSV's extra columns reach results.jsonl (and from there the dataset exports)."""
    from runner_helpers import inprocess, load_results

    from batchflux import batch
    from batchflux.models import RunOptions
    from batchflux.sim import SimSettings, create_app

    (tmp_path / "catalogue.csv").write_text(
        "sku,caption,category\nMUG-1,a red mug,kitchen\nLAMP-2,a brass lamp,lighting\n")
    manifest = tmp_path / "catalogue.yaml"
    manifest.write_text("prompts_file: {path: catalogue.csv, text_column: caption, "
                        "id_column: sku, meta_columns: [sku, category]}\n"
                        "grid: {seeds: [1]}\n")
    app = create_app(SimSettings(job_seconds=0.05, queue_seconds=0.0, render_mode="fast"))
    result = await batch.run_batch_async(manifest, RunOptions(out_dir=tmp_path / "out"),
                                         target=inprocess(app))
    assert result.exit_code == 0
    metas = sorted((r["meta"]["sku"], r["meta"]["category"])
                   for r in load_results(tmp_path / "out"))
    assert metas == [("LAMP-2", "lighting"), ("MUG-1", "kitchen")]
