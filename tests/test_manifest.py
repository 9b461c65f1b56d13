"""Loading manifests: YAML features, positions, run options, prompt files, schemas."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from batchflux.errors import ManifestError
from batchflux.expand import count_items, expand_job
from batchflux.manifest import check_filename_template, load_job
from batchflux.models import RunOptions
from batchflux.schema import load_schema


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def diagnostics(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_job(path, **kwargs)
    return [str(d) for d in info.value.diagnostics]


def test_run_block_maps_to_run_options_with_unset_fields_none(tmp_path):
    spec = load_job(write(tmp_path, """\
        model: flux-2-pro
        prompts: [a fox]
        run:
          out_dir: out/x
          concurrency: 4
          rpm: 120
          budget: 50
          filename_template: "{prompt_id}/{index:06d}_{key12}.{ext}"
        """))
    assert spec.model == "flux-2-pro"
    assert spec.options == RunOptions(out_dir="out/x", concurrency=4, rpm=120.0, budget=50.0,
                                      filename_template="{prompt_id}/{index:06d}_{key12}.{ext}")
    assert isinstance(spec.options.rpm, float)
    assert spec.path == tmp_path / "job.yaml"


def test_manifest_without_run_block_sets_nothing(tmp_path):
    spec = load_job(write(tmp_path, "prompts: [a fox]\n"))
    assert spec.options == RunOptions()
    assert spec.model == "flux-2-dev"


def test_all_errors_are_reported_at_once_sorted(tmp_path):
    lines = diagnostics(write(tmp_path, """\
        defaults:
          output_quality: 500
        prompts:
          - text: "a {missing} fox"
          - id: fox
            text: a bird
        run:
          concurrency: 0
        """))
    assert lines == [
        f"{tmp_path / 'job.yaml'}:2:19: defaults.output_quality: must be at most 100; got 500",
        f"{tmp_path / 'job.yaml'}:8:16: run.concurrency: must be at least 1; got 0",
    ]


def test_semantic_errors_of_several_entries_are_reported_together(tmp_path):
    lines = diagnostics(write(tmp_path, """\
        prompts:
          - text: "a {missing} fox"
          - text: a bird
            aspect_ratio: match_input_image
          - text: a cat
            width: 512
        """))
    assert [line.split(": ", 1)[0].rsplit(":", 2)[1:] for line in lines] == [
        ["2", "11"], ["4", "19"], ["6", "5"]]


def test_yaml_merge_keys_in_entries(tmp_path):
    spec = load_job(write(tmp_path, """\
        defaults: &d
          output_format: png
          output_quality: 95
        prompts:
          - text: a fox
            <<: *d
          - text: a bird
            <<: *d
            output_quality: 70
        """))
    fox, bird = expand_job(spec)
    assert (fox.params["output_format"], fox.params["output_quality"]) == ("png", 95)
    assert (bird.params["output_format"], bird.params["output_quality"]) == ("png", 70)


def test_yaml_timestamps_become_strings(tmp_path):
    (item,) = expand_job(load_job(write(tmp_path, """\
        prompts:
          - text: "news of {day}"
            vars: {day: 2024-05-01}
        """)))
    assert item.prompt == "news of 2024-05-01"


def test_template_literal_braces_and_repeated_variables(tmp_path):
    (item,) = expand_job(load_job(write(tmp_path, """\
        prompts:
          - text: "{{logo}} {x} and {x}"
            vars: {x: 1.5}
        """)))
    assert item.prompt == "{logo} 1.5 and 1.5" and item.vars == {"x": 1.5}


def test_plain_strings_are_literal_prompts(tmp_path):
    (item,) = expand_job(load_job(write(tmp_path, 'prompts: ["a {literal} brace"]\n')))
    assert item.prompt == "a {literal} brace" and item.template is None


def test_max_items_guard_and_override(tmp_path):
    path = write(tmp_path, "grid: {seeds: '1-50'}\nprompts: [a, b]\nrun: {max_items: 60}\n")
    assert diagnostics(path) == [
        f"{path}:1:1: grid: the grid expands to 100 items, over max_items 60 "
        "(set run.max_items or pass --max-items to allow it)"]
    assert count_items(load_job(path, max_items=100)) == 100


def test_tsv_prompts_by_column_mapping_with_skip_and_limit(tmp_path):
    (tmp_path / "p.tsv").write_text(
        'Prompt\tCategory\tKey\nA "quoted" fox\tAnimals\tfox\na bird\tAnimals\tbird\n'
        "a cat\tAnimals\tcat\n", encoding="utf-8")
    spec = load_job(write(tmp_path, """\
        prompts_file: {path: p.tsv, text_column: Prompt, id_column: Key, skip: 1, limit: 1}
        """))
    (item,) = expand_job(spec)
    assert (item.prompt, item.prompt_id, item.source) == ("a bird", "bird", f"{tmp_path}/p.tsv:3")


def test_csv_prompts_with_derived_ids_by_row(tmp_path):
    (tmp_path / "p.csv").write_text('text,other\n"a fox, running",1\n"a bird",2\n',
                                    encoding="utf-8")
    spec = load_job(write(tmp_path, "prompts_file: {path: p.csv, text_column: text}\n"
                                    "grid: {seeds: [1, 2]}\n"))
    items = list(expand_job(spec))
    assert [(i.prompt, i.prompt_id, i.seed) for i in items] == [
        ("a fox, running", "p0001", 1), ("a fox, running", "p0001", 2),
        ("a bird", "p0002", 1), ("a bird", "p0002", 2)]


def test_jsonl_prompts_file_inherits_yaml_defaults_and_grid(tmp_path):
    (tmp_path / "items.jsonl").write_text(
        '{"prompt": "a fox"}\n{"prompt": "a bird", "fluxParams": {"output_format": "jpg"}}\n',
        encoding="utf-8")
    spec = load_job(write(tmp_path, """\
        defaults: {output_format: png}
        grid: {aspect_ratio: ["1:1", "3:2"]}
        prompts_file: items.jsonl
        """))
    items = list(expand_job(spec))
    assert [(i.params["aspect_ratio"], i.params["output_format"]) for i in items] == [
        ("1:1", "png"), ("3:2", "png"), ("1:1", "jpg"), ("3:2", "jpg")]


def test_jsonl_error_columns_point_at_the_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "ok"}\n  {"prompt": "x", "fluxParams": {"seed": "7"}}\n',
                    encoding="utf-8")
    line = '  {"prompt": "x", "fluxParams": {"seed": "7"}}'
    col = line.index('"7"') + 1
    assert diagnostics(path) == [
        f"{path}:2:{col}: fluxParams.seed: expected integer or list, got string \"7\""]


def test_remote_input_images_are_kept_as_urls(tmp_path):
    (item,) = expand_job(load_job(write(tmp_path, """\
        defaults:
          aspect_ratio: match_input_image
          input_images: [https://example.com/a.png]
        prompts: [like this]
        """)))
    assert item.params["input_images"] == ["https://example.com/a.png"]
    assert item.local_inputs == ()


def test_duplicate_entries_are_warnings_not_errors(tmp_path):
    spec = load_job(write(tmp_path, "prompts: [a fox, a bird, a fox]\n"))
    assert [w.field for w in spec.warnings] == ["p0003"]
    assert "same requests as p0001" in spec.warnings[0].message


@pytest.mark.parametrize("template,problem", [
    ("{prompt_id}/{key12}.{ext}", None),
    ("{index:06d}_{key12}.{ext}", None),
    ("{index:06d}.{ext}", "must contain {key} or {key12}: {index} alone changes"),
    ("{prompt_id}/{seed}.{ext}", "must contain {key} or {key12}"),
    ("../{key}.{ext}", "must be a relative path without '..'"),
    ("{key}.{extension}", "unknown placeholder {extension}"),
])
def test_filename_template_check(template, problem):
    result = check_filename_template(template)
    assert (result is None) if problem is None else (problem in result)


def test_schemas_ship_in_the_package_and_document_every_field():
    for name in ("job", "item"):
        schema = load_schema(name)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"

        def walk(node, path, name=name):
            for key, sub in node.get("properties", {}).items():
                assert "description" in sub, (name, path + [key])
                assert "examples" in sub, (name, path + [key])
                walk(sub, path + [key])
            for key in ("items", "then", "additionalProperties"):
                if isinstance(node.get(key), dict):
                    walk(node[key], path + [key])

        walk(schema, [])
    assert Path("schemas/job.schema.json").resolve() == Path(
        "batchflux/schemas/job.schema.json").resolve()


def test_job_schema_accepts_the_example_manifests():
    validator = jsonschema.Draft202012Validator(load_schema("job"))
    for path in Path("jobs").glob("*.yaml"):
        validator.validate(yaml.safe_load(path.read_text()))
    item_validator = jsonschema.Draft202012Validator(load_schema("item"))
    for line in Path("jobs/dataset-prompts.jsonl").read_text().splitlines():
        item_validator.validate(json.loads(line))


def test_an_empty_value_is_named_once_not_null_null(tmp_path):
    """Issue 10: "expected integer, got null null" for an empty YAML value."""
    path = write(tmp_path, """\
        defaults:
          output_quality:
        prompts:
          - a red fox
          - text:
        """)
    with pytest.raises(ManifestError) as caught:
        load_job(path)
    assert [str(d) for d in caught.value.diagnostics] == [
        f"{path}:2:18: defaults.output_quality: expected integer, got an empty value (null)",
        f"{path}:5:10: prompts[1].text: expected string, got an empty value (null)",
    ]
