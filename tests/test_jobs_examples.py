"""Every example in jobs/ validates and plans, and says what its comments promise."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from batchflux.expand import count_items, expand_job
from batchflux.manifest import load_job
from batchflux.plan import plan_command, validate_command

JOBS = Path(__file__).resolve().parent.parent / "jobs"
MANIFESTS = sorted(p for p in JOBS.iterdir() if p.suffix in (".yaml", ".yml", ".jsonl"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_example_validates_and_plans(path):
    out, err = io.StringIO(), io.StringIO()
    assert validate_command([str(path)], out=out, err=err) == 0, err.getvalue()
    out = io.StringIO()
    assert plan_command(str(path), as_json=True, limit=5, max_items=None, cost_per_image=None,
                        out=out, err=err) == 0
    plan = json.loads(out.getvalue())
    assert plan["items"] == count_items(load_job(path)) > 0
    assert plan["duplicates"]["found"] == 0


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.suffix != ".jsonl"],
                         ids=lambda p: p.name)
def test_yaml_example_starts_with_the_schema_line(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/job.schema.json"


def test_product_photos_is_48_images_with_real_reference_pngs():
    spec = load_job(JOBS / "product-photos.yaml")
    items = list(expand_job(spec))
    assert len(items) == 48
    refs = {ref for item in items for ref in item.local_inputs}
    assert {Path(r).name for r in refs} == {"mug.png", "sneaker.png"}
    for ref in refs:
        with Image.open(ref) as image:
            assert image.format == "PNG" and image.size == (256, 256)
        assert Path(ref).stat().st_size < 8192


def test_dataset_uses_20_partiprompts_and_the_tsv_variant_maps_columns():
    assert len((JOBS / "dataset-prompts.jsonl").read_text().splitlines()) == 20
    # 19 lines x the grid's 4 seeds, and one line with its own 4 seeds
    assert count_items(load_job(JOBS / "dataset.yaml")) == 80
    parti = list(expand_job(load_job(JOBS / "dataset-parti.yaml")))
    assert len(parti) == 400 and parti[0].prompt == "bond" and parti[0].prompt_id == "p0001"
    assert parti[0].meta == {"Category": "Abstract", "Challenge": "Basic"}
    assert (JOBS / "data" / "PartiPrompts.LICENSE").exists()


def test_nightly_has_fixed_seeds_and_a_budget():
    spec = load_job(JOBS / "nightly.yaml")
    assert spec.options.budget == 40
    assert {item.seed for item in expand_job(spec)} == {11, 22}
