"""Grid expansion: axes, zip groups, seeds, repeat, keys and their stability."""

from __future__ import annotations

import itertools
import shutil
import textwrap
from pathlib import Path

from PIL import Image

from batchflux.expand import (
    MAX_SEED,
    axis_sizes,
    canonical_json,
    count_items,
    expand_job,
    request_key,
)
from batchflux.manifest import load_job


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def items_of(path: Path):
    return list(expand_job(load_job(path)))


def test_product_of_vars_params_and_seeds_in_declared_order(tmp_path):
    path = write(tmp_path, """\
        vars:
          color: [red, blue]
        grid:
          aspect_ratio: ["1:1", "16:9"]
          seeds: "5-7"
        prompts:
          - id: mug
            text: "a {color} mug"
        """)
    spec = load_job(path)
    items = list(expand_job(spec))
    assert count_items(spec) == len(items) == 12
    assert axis_sizes(spec) == {"prompts": 1, "vars.color": 2, "aspect_ratio": 2, "seed": 3}
    assert [i.index for i in items] == list(range(12))
    combos = [(i.vars["color"], i.params["aspect_ratio"], i.seed) for i in items]
    assert combos == list(itertools.product(["red", "blue"], ["1:1", "16:9"], [5, 6, 7]))
    assert items[0].prompt == "a red mug" and items[0].template == "a {color} mug"
    assert len({i.key for i in items}) == 12


def test_every_item_records_every_param_with_defaults_filled(tmp_path):
    items = items_of(write(tmp_path, "prompts: [a red fox]\n"))
    (item,) = items
    assert list(item.params) == ["aspect_ratio", "seed", "output_format", "output_quality",
                                 "go_fast"]
    assert item.params["aspect_ratio"] == "1:1"
    assert item.params["output_format"] == "webp"
    assert item.params["output_quality"] == 80
    assert item.params["go_fast"] is True
    assert 0 <= item.seed <= MAX_SEED
    assert item.prompt_id == "p0001"
    assert item.template is None
    assert item.source == f"{tmp_path / 'job.yaml'}:1"


def test_width_height_kept_only_for_custom(tmp_path):
    items = items_of(write(tmp_path, """\
        grid:
          aspect_ratio: ["custom", "1:1"]
          width: 768
          height: 512
        prompts: [a fox]
        """))
    custom, square = items
    assert custom.params["width"] == 768 and custom.params["height"] == 512
    assert "width" not in square.params and "height" not in square.params


def test_zip_pairs_values_instead_of_multiplying(tmp_path):
    spec = load_job(write(tmp_path, """\
        grid:
          zip:
            - aspect_ratio: ["1:1", "16:9", "9:16"]
              output_quality: [90, 80, 70]
          seeds: [1, 2]
        prompts: [a fox]
        """))
    items = list(expand_job(spec))
    assert count_items(spec) == 6
    assert axis_sizes(spec)["zip(aspect_ratio,output_quality)"] == 3
    pairs = {(i.params["aspect_ratio"], i.params["output_quality"]) for i in items}
    assert pairs == {("1:1", 90), ("16:9", 80), ("9:16", 70)}


def test_zip_can_pair_a_variable_with_reference_images(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    items = items_of(write(tmp_path, """\
        prompts:
          - text: "the {thing} from the reference"
            zip:
              - thing: [mug, shoe]
                input_images: [[a.png], [b.png]]
        """))
    assert [(i.vars["thing"], Path(i.params["input_images"][0]).name) for i in items] == [
        ("mug", "a.png"), ("shoe", "b.png")]
    assert all(Path(i.params["input_images"][0]).is_absolute() for i in items)


def test_entry_overrides_grid_and_defaults(tmp_path):
    items = items_of(write(tmp_path, """\
        defaults:
          output_format: png
        grid:
          aspect_ratio: ["1:1", "16:9"]
          seeds: [1]
        prompts:
          - a fox
          - text: a bird
            aspect_ratio: "4:5"
            output_format: jpg
            seeds: [9, 10]
        """))
    fox = [i for i in items if i.prompt == "a fox"]
    bird = [i for i in items if i.prompt == "a bird"]
    assert [(i.params["aspect_ratio"], i.params["output_format"], i.seed) for i in fox] == [
        ("1:1", "png", 1), ("16:9", "png", 1)]
    assert [(i.params["aspect_ratio"], i.params["output_format"], i.seed) for i in bird] == [
        ("4:5", "jpg", 9), ("4:5", "jpg", 10)]


def test_derived_seeds_are_deterministic_and_repeat_gives_distinct_items(tmp_path):
    path = write(tmp_path, "grid: {repeat: 3}\nprompts: [a fox]\n")
    first, second = items_of(path), items_of(path)
    assert [i.seed for i in first] == [i.seed for i in second]
    assert [i.key for i in first] == [i.key for i in second]
    assert len({i.seed for i in first}) == 3
    assert len({i.key for i in first}) == 3
    # the first repeat keeps the seed of a repeat-less manifest: raising repeat adds items
    (single,) = items_of(write(tmp_path, "prompts: [a fox]\n", "single.yaml"))
    assert single.seed == first[0].seed and single.key == first[0].key


def test_seed_count_without_start_derives_seeds(tmp_path):
    spec = load_job(write(tmp_path, "grid: {seeds: {count: 4}}\nprompts: [a fox]\n"))
    items = list(expand_job(spec))
    assert count_items(spec) == 4 and len({i.seed for i in items}) == 4
    assert axis_sizes(spec) == {"prompts": 1, "repeat": 4}


def test_key_is_sha256_of_canonical_request(tmp_path):
    (item,) = items_of(write(tmp_path, "defaults: {seed: 7}\nprompts: [a fox]\n"))
    import hashlib

    canonical = canonical_json({"model": "flux-2-dev", "prompt": "a fox",
                                "params": dict(item.params)})
    assert item.key == hashlib.sha256(canonical.encode()).hexdigest()
    assert item.key == request_key("flux-2-dev", "a fox", item.params, {})


def test_appending_prompts_never_changes_existing_items(tmp_path):
    base = """\
        vars:
          style: [photo, watercolour]
        grid:
          seeds: {count: 2}
        prompts:
          - a fox
          - text: "a {style} owl"
        """
    before = items_of(write(tmp_path, base))
    grown = textwrap.dedent(base) + '  - a heron\n  - text: "{style} cat"\n'
    after = items_of(write(tmp_path, grown, "grown.yaml"))
    strip = [(i.index, i.key, i.prompt_id, i.seed, i.prompt) for i in before]
    assert [(i.index, i.key, i.prompt_id, i.seed, i.prompt) for i in after[:len(before)]] == strip
    assert [i.prompt_id for i in after[len(before):]] == ["p0003"] * 2 + ["p0004"] * 4


def test_local_image_keys_survive_moving_the_manifest(tmp_path):
    one = tmp_path / "one"
    (one / "assets").mkdir(parents=True)
    Image.new("RGB", (16, 16), "green").save(one / "assets" / "ref.png")
    write(one, "prompts:\n  - text: like this\n    input_images: [assets/ref.png]\n")
    two = tmp_path / "elsewhere" / "two"
    shutil.copytree(one, two)
    a, b = items_of(one / "job.yaml"), items_of(two / "job.yaml")
    assert a[0].key == b[0].key and a[0].seed == b[0].seed
    assert a[0].params["input_images"] != b[0].params["input_images"]
    # a different picture under the same name is a different request
    Image.new("RGB", (16, 16), "purple").save(two / "assets" / "ref.png")
    assert items_of(two / "job.yaml")[0].key != a[0].key


def test_expansion_is_lazy_and_counting_is_arithmetic(tmp_path):
    path = write(tmp_path, """\
        grid:
          seeds: "1-1000000"
          aspect_ratio: ["1:1", "16:9"]
        prompts: [a fox, a bird]
        run: {max_items: 5000000}
        """)
    spec = load_job(path)
    assert count_items(spec) == 4_000_000
    stream = expand_job(spec)
    first = next(stream)
    assert (first.index, first.seed) == (0, 1)
    assert [i.index for i in itertools.islice(stream, 3)] == [1, 2, 3]


def test_count_matches_expansion_on_mixed_entries(tmp_path):
    spec = load_job(write(tmp_path, """\
        vars: {x: [a, b, c]}
        grid:
          seeds: [1, 2]
        prompts:
          - plain
          - text: "{x} one"
          - text: "{x} {y}"
            vars: {y: [q, r]}
            repeat: 1
            aspect_ratio: ["1:1", "4:3", "3:4"]
        """))
    assert count_items(spec) == sum(1 for _ in expand_job(spec)) == 2 + 6 + 36


def test_jsonl_items_expand_with_their_own_axes(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(
        '{"prompt": "a fox", "seeds": [1, 2]}\n'
        '\n'
        '{"id": "owl", "prompt": "a {c} owl", "vars": {"c": ["grey", "snowy"]}, '
        '"fluxParams": {"aspect_ratio": ["1:1", "16:9"], "output_format": "png"}}\n',
        encoding="utf-8")
    spec = load_job(path)
    items = list(expand_job(spec))
    assert spec.format == "jsonl" and count_items(spec) == 6
    assert [i.prompt_id for i in items] == ["p0001"] * 2 + ["owl"] * 4
    assert items[2].prompt == "a grey owl" and items[2].params["output_format"] == "png"
    assert items[2].source == f"{path}:3"


def test_duplicated_lines_yield_the_same_key(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"prompt": "a fox"}\n{"prompt": "a fox"}\n', encoding="utf-8")
    a, b = items_of(path)
    assert a.key == b.key and a.prompt_id != b.prompt_id
