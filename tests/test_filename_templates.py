"""Defects 4 and 5 of issue 10: file-name templates. Format specs work (typed values), a spec
that cannot format is refused by `validate` before anything is paid, a template must name the
item by its key (an index changes when prompts are inserted), and two downloads never share a
temp file."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path

import anyio
import pytest
import yaml
from runner_helpers import check_run_directory, load_results, loopback, write_manifest

from batchflux import batch
from batchflux.cli import main
from batchflux.errors import UsageError
from batchflux.expand import expand_job
from batchflux.filenames import FILENAME_PLACEHOLDERS, render_filename
from batchflux.manifest import check_filename_template, load_job
from batchflux.models import RunOptions, WorkItem
from batchflux.plan import validate_command
from batchflux.sim import SimSettings, serve_in_thread
from batchflux.store import FilenameTemplateError, RunStore
from batchflux.verify import verify_run

ROOT = Path(__file__).resolve().parent.parent
FAST = SimSettings(job_seconds=0.05, queue_seconds=0.01, render_mode="fast", credits=100_000)


def item(index: int = 7, seed: int = 42) -> WorkItem:
    return WorkItem(index=index, key=hashlib.sha256(b"x").hexdigest(), prompt_id="mug",
                    prompt="a mug", params={"seed": seed, "aspect_ratio": "16:9"})


# --------------------------------------------------------------------------------------------
# Format specs


def test_format_specs_format_typed_values() -> None:
    it = item()
    assert render_filename("{prompt_id}/{index:04d}_{key12}_{seed:08d}.{ext}", it,
                           ext="png") == f"mug/0007_{it.key[:12]}_00000042.png"
    assert render_filename("{key12}_{w:05d}x{h:05d}_{aspect}.{ext}", it, ext="webp",
                           width=1024, height=576) == f"{it.key[:12]}_01024x00576_16x9.webp"
    # Strings take string specs; the result is sanitised after formatting.
    assert render_filename("{prompt_id:0>6}/{key:.8}.{ext}", it, ext="jpg") == \
        f"000mug/{it.key[:8]}.jpg"


@pytest.mark.parametrize("template", ["{prompt_id:04d}_{key}.{ext}", "{key12}_{seed:.2s}.{ext}",
                                      "{key}_{aspect:d}.{ext}", "{key12}_{seed:c}.{ext}"])
def test_a_spec_that_cannot_format_is_refused_by_the_check(template: str) -> None:
    problem = check_filename_template(template)
    assert problem is not None and problem.startswith("cannot format {"), problem
    with pytest.raises(FilenameTemplateError):
        render_filename(template, item(seed=4_294_967_295), ext="png")


def test_every_placeholder_renders_in_a_valid_template() -> None:
    template = "_".join("{" + name + "}" for name in sorted(FILENAME_PLACEHOLDERS))
    assert check_filename_template(template) is None
    assert render_filename(template, item(), ext="png", width=8, height=9)


def test_a_run_with_format_specs_names_its_files_by_them(tmp_path: Path) -> None:
    """docs/manifest.md's example spec: on the old code every download ended in exit 70 after
    the jobs were paid ("Unknown format code 'd'")."""
    template = "{prompt_id}/{index:04d}_{key12}_{seed:08d}.{ext}"
    manifest = write_manifest(tmp_path, prompts=2, seeds=2, aspects=("1:1",),
                              extra=f"run:\n  filename_template: \"{template}\"\n")
    out = tmp_path / "out"
    with serve_in_thread(FAST) as base_url:
        result = batch.run_batch(manifest, RunOptions(out_dir=out), target=loopback(base_url))
    assert result.exit_code == 0
    records = check_run_directory(out, expected_items=4)
    for record in records:
        (f,) = record["files"]
        assert f["path"] == (f"images/{record['prompt_id']}/{record['index']:04d}_"
                             f"{record['key'][:12]}_{record['seed']:08d}.webp")


# --------------------------------------------------------------------------------------------
# Stable under manifest edits


@pytest.mark.parametrize("template", ["{index}.{ext}", "{prompt_id}/{index:04d}.{ext}",
                                      "{index}_{seed}_{aspect}.{ext}"])
def test_an_index_only_template_is_refused_with_the_reason(template: str) -> None:
    problem = check_filename_template(template)
    assert problem == ("must contain {key} or {key12}: {index} alone changes when prompts are "
                       "inserted or removed, and a new item would then overwrite another "
                       "item's image")


def test_a_template_without_the_key_is_refused() -> None:
    assert check_filename_template("{prompt_id}/{seed}_{aspect}.{ext}") == (
        "must contain {key} or {key12} so that every item has its own file name")


def test_validate_refuses_an_index_template_before_anything_is_paid(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=1,
                              extra="run:\n  filename_template: \"{index}.{ext}\"\n")
    out, err = io.StringIO(), io.StringIO()
    assert validate_command([str(manifest)], out=out, err=err) == 65
    assert "run.filename_template: must contain {key} or {key12}: {index} alone" in err.getvalue()
    assert main(["run", str(manifest), "--sim", "--out", str(tmp_path / "out")]) == 65
    assert not (tmp_path / "out").exists()


def test_a_library_template_without_the_key_is_refused_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\{index\} alone changes"):
        RunStore(tmp_path / "out", filename_template="{index}.{ext}")
    with pytest.raises(UsageError, match="cannot format"):
        RunStore(tmp_path / "out", filename_template="{key}_{seed:s}.{ext}")
    assert not (tmp_path / "out").exists()


def test_inserting_a_prompt_at_the_top_overwrites_no_image(tmp_path: Path) -> None:
    """Defect 5: with names that carry the index, a grown manifest wrote new items over old
    ones (two ok lines, one file, sha256 wrong, exit 0). With the key in every name, a grown
    manifest only adds files."""
    template = "{index:03d}_{key12}.{ext}"
    extra = f"run:\n  filename_template: \"{template}\"\n"
    manifest = write_manifest(tmp_path, prompts=2, seeds=2, aspects=("1:1",), extra=extra)
    out = tmp_path / "out"
    with serve_in_thread(FAST) as base_url:
        assert batch.run_batch(manifest, RunOptions(out_dir=out),
                               target=loopback(base_url)).exit_code == 0
        before = {f["path"]: f["sha256"] for r in load_results(out) for f in r["files"]}
        text = manifest.read_text().replace(
            "prompts:\n", "prompts:\n  - id: new\n    text: \"a new first prompt\"\n", 1)
        manifest.write_text(text)
        assert len(load_job(manifest).entries) == 3
        assert batch.run_batch(manifest, RunOptions(out_dir=out),
                               target=loopback(base_url)).exit_code == 0
    records = check_run_directory(out, expected_items=6)
    paths = [f["path"] for r in records for f in r["files"]]
    assert len(set(paths)) == 6
    for path, sha in before.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == sha
    assert verify_run(out).ok


# --------------------------------------------------------------------------------------------
# Temp files


def test_two_downloads_of_one_key_never_share_a_temp_file(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "out", filename_template="{key}.{ext}")
    store.open()
    seen: list[Path] = []

    async def download(data: bytes, ready: anyio.Event, other: anyio.Event) -> None:
        async with store.temp_image(item(), 1) as temp:
            seen.append(temp.path)
            await temp.write(data)
            ready.set()
            await other.wait()  # both are open at the same time
        # A clean exit keeps the temp file for the caller (commit or remove).
        assert temp.path.read_bytes() == data

    async def both() -> None:
        a, b = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(download, b"first", a, b)
            tg.start_soon(download, b"second", b, a)

    try:
        anyio.run(both)
    finally:
        store.close()
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(p.parent == store.tmp_dir for p in seen)


def test_the_docs_list_every_placeholder() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "manifest.md").read_text()
    for name in FILENAME_PLACEHOLDERS:
        assert f"`{{{name}}}`" in doc, name
    assert "`{vars.NAME}`" in doc  # the template-variable placeholder
    examples = re.findall(r'filename_template: "([^"]+)"', doc)
    assert "{prompt_id}/{index:04d}_{key12}_{seed:08d}.{ext}" in examples
    for template in examples:  # every template the docs show is one validate accepts
        assert check_filename_template(template) is None, template



def test_the_schema_examples_and_default_are_valid_templates() -> None:
    from batchflux.schema import load_schema

    spec = load_schema("job")["properties"]["run"]["properties"]["filename_template"]
    for template in [spec["default"], *spec["examples"]]:
        assert check_filename_template(template) is None, template


# --------------------------------------------------------------------------------------------
# Template variables in file names (issue 13, point 6)


def test_the_readme_product_photos_template_puts_each_background_in_its_own_folder(
        tmp_path: Path) -> None:
    """Issue 13.6: `{prompt_id}/{aspect}/{key12}_{seed}.{ext}` put both backgrounds in one
    folder, told apart only by a hash. The README's example now names the background."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (snippet,) = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)
                  if "filename_template" in block and "background" in block]
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    manifest = tmp_path / "jobs" / "readme-product-photos.yaml"
    manifest.write_text(snippet, encoding="utf-8")
    spec = load_job(manifest)
    template = spec.options.filename_template
    assert template is not None and "{vars.background}" in template
    folders: dict[tuple[str, str], set[str]] = {}
    for it in expand_job(spec):
        path = render_filename(template, it, ext="png")
        group = (it.prompt_id, str(it.params["aspect_ratio"]))
        folders.setdefault(group, set()).add(path.rsplit("/", 1)[0])
    backgrounds = yaml.safe_load(snippet)["vars"]["background"]
    assert len(backgrounds) == 2
    for group, dirs in folders.items():
        assert len(dirs) == 2, (group, dirs)  # one folder per background
    assert {d.split("/")[1] for dirs in folders.values() for d in dirs} == {
        "a_seamless_white_studio_backdrop", "a_warm_oak_kitchen_counter"}


def test_the_product_photos_job_uses_a_vars_placeholder() -> None:
    spec = load_job(ROOT / "jobs" / "product-photos.yaml")
    assert "{vars.background}" in (spec.options.filename_template or "")
    dirs = {render_filename(spec.options.filename_template or "", it, ext="png").split("/")[1]
            for it in expand_job(spec)}
    assert len(dirs) == 2


def test_a_vars_placeholder_is_sanitised_and_empty_for_a_prompt_without_it() -> None:
    it = WorkItem(index=0, key="ab" * 32, prompt_id="mug", prompt="x",
                  params={"seed": 1, "aspect_ratio": "1:1"},
                  vars={"background": "../../etc/a caf\u00e9 \u202e/bench", "n": 3})
    assert render_filename("{vars.background}/{vars.n}_{key12}.{ext}", it, ext="png") == \
        "etc_a_cafe_bench/3_abababababab.png"
    assert render_filename("{vars.background:.6}/{key12}.{ext}", it, ext="png") == \
        "etc_a/abababababab.png"
    plain = WorkItem(index=1, key="cd" * 32, prompt_id="p0002", prompt="x",
                     params={"seed": 1, "aspect_ratio": "1:1"})
    assert render_filename("{prompt_id}/{vars.background}/{key12}.{ext}", plain,
                           ext="png") == "p0002/cdcdcdcdcdcd.png"


@pytest.mark.parametrize("template, problem", [
    ("{vars.colour}/{key12}.{ext}", ("unknown placeholder {vars.colour}: no prompt uses a "
                                     "template variable 'colour' (variables: background)")),
    ("{vars}/{key12}.{ext}", "unknown placeholder {vars} (known: "),
    ("{vars.a.b}/{key12}.{ext}", "invalid placeholder {vars.a.b}: write {vars.NAME} "),
    ("{vars.background:d}/{key12}.{ext}", "cannot format {vars.background:d}: "),
])
def test_a_bad_vars_placeholder_is_refused_with_the_reason(template: str, problem: str) -> None:
    found = check_filename_template(template, variables={"background"})
    assert found is not None and found.startswith(problem), found


def test_validate_refuses_a_vars_placeholder_that_no_prompt_uses(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "vars: {background: [white, oak]}\n"
        "prompts:\n  - a plain prompt\n  - text: \"a mug on {background}\"\n"
        "run:\n  filename_template: \"{vars.colour}/{key12}.{ext}\"\n", encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    assert validate_command([str(manifest)], out=out, err=err) == 65
    assert err.getvalue() == (
        f"{manifest}:6:22: run.filename_template: unknown placeholder {{vars.colour}}: no "
        "prompt uses a template variable 'colour' (variables: background)\n")
    manifest.write_text(manifest.read_text().replace("vars.colour", "vars.background"))
    assert validate_command([str(manifest)], out=out, err=err) == 0


def test_a_run_writes_each_variant_into_its_variable_folder(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "vars: {background: [white studio, oak counter]}\n"
        "grid: {seeds: [1, 2]}\n"
        "prompts:\n  - {id: mug, text: \"a mug on a {background}\"}\n"
        "run:\n  filename_template: \"{prompt_id}/{vars.background}/{key12}_{seed}.{ext}\"\n",
        encoding="utf-8")
    out = tmp_path / "out"
    with serve_in_thread(FAST) as base_url:
        result = batch.run_batch(manifest, RunOptions(out_dir=out), target=loopback(base_url))
    assert result.exit_code == 0
    records = check_run_directory(out, expected_items=4)
    for record in records:
        (f,) = record["files"]
        folder = record["vars"]["background"].replace(" ", "_")
        assert f["path"] == (f"images/mug/{folder}/{record['key'][:12]}_{record['seed']}"
                             ".webp")
