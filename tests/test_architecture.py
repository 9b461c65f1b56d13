"""The module boundaries of DESIGN.md section 3, and the type checker, as tests."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "batchflux"

#: Each third-party library lives in as few modules as possible, so replacing one touches
#: one place. A new import of one of these elsewhere is a design decision: make it here.
ALLOWED = {
    "httpx": {"apiframe.py", "batch.py", "sim/app.py", "sim/faults.py", "sim/webhooks.py"},
    "yaml": {"manifest/yaml_positions.py"},
    "jsonschema": {"schema.py"},
    "aiofiles": {"store.py"},
    "PIL": {"imagecheck.py", "manifest/images.py", "review.py", "sim/render.py"},
    "rich": {"progress.py", "report.py"},
    "starlette": {"sim/app.py", "sim/faults.py", "reviewapp/app.py", "webhooks.py"},
    "uvicorn": {"sim/serve.py", "reviewapp/serve.py", "webhooks.py"},
}
PURE = {"errors.py", "models.py", "expand.py", "retry.py", "shard.py", "display.py",
        "filenames.py", "wording.py"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level
            names.add(prefix + (node.module or ""))
    return names


def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): imports(p) for p in PACKAGE.rglob("*.py")}


def test_each_library_is_imported_only_where_the_design_puts_it() -> None:
    for rel, names in modules().items():
        for lib, allowed in ALLOWED.items():
            uses = any(n == lib or n.startswith(lib + ".") for n in names)
            assert not uses or rel in allowed, f"{rel} imports {lib}"


def test_pure_modules_do_no_io_and_import_no_adapter() -> None:
    adapters = {"apiframe", "store", "report", "runner", "batch", "cli", "sim"}
    for rel, names in modules().items():
        if rel not in PURE:
            continue
        for name in names:
            top = name.lstrip(".").split(".")[0]
            assert top not in adapters, f"{rel} imports {name}"
            assert not any(name == lib or name.startswith(lib + ".") for lib in ALLOWED), (
                f"{rel} imports {name}")


def absolute_imports(rel: str) -> set[str]:
    """Every batchflux module (and imported name) that ``rel`` imports, spelled absolutely:
    ``from .manifest import load_job`` in ``expand.py`` gives ``batchflux.manifest`` and
    ``batchflux.manifest.load_job``; ``from . import manifest`` gives
    ``batchflux.manifest``."""
    path = PACKAGE / rel
    package = ["batchflux", *Path(rel).parent.parts]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_absolute_imports_resolve_relative_ones() -> None:
    names = absolute_imports("manifest/load.py")
    assert "batchflux.models.JobSpec" in names and "batchflux.manifest.text" in names


def test_models_and_expand_never_import_the_manifest_readers() -> None:
    """The values a manifest is read into live in models; expand works on those values, so
    neither depends on the readers (no import cycle, even one only for type checking)."""
    for rel in ("models.py", "expand.py"):
        for name in absolute_imports(rel):
            assert not (name == "batchflux.manifest" or name.startswith("batchflux.manifest.")), (
                f"{rel} imports {name}")


def test_models_import_nothing_of_batchflux() -> None:
    assert not any(n == "batchflux" or n.startswith("batchflux.")
                   for n in absolute_imports("models.py"))


def test_plan_takes_value_types_from_models_and_only_load_job_from_the_readers() -> None:
    manifest_names = {n for n in absolute_imports("plan.py")
                      if n.startswith("batchflux.manifest.")}
    assert manifest_names == {"batchflux.manifest.load_job"}


#: The post-run tools: they read a finished (or running) run directory. They share the run's
#: values (models), its store's readers and the neutral helpers (stats, summary, fileutil),
#: never the machinery that makes a run.
POST_RUN_TOOLS = ("results.py", "report.py", "review.py", "merge.py", "dataset.py", "verify.py",
                  "plan.py", "reviewapp/__init__.py", "reviewapp/app.py",
                  "reviewapp/decisions.py", "reviewapp/serve.py")
RUN_MACHINERY = ("runner", "lifecycle", "batch", "apiframe", "completion", "limits", "runcmd")


@pytest.mark.parametrize("rel", POST_RUN_TOOLS)
def test_post_run_tools_never_import_the_run_machinery(rel: str) -> None:
    for name in absolute_imports(rel):
        parts = name.split(".")
        assert not (parts[0] == "batchflux" and len(parts) > 1 and parts[1] in RUN_MACHINERY), (
            f"{rel} imports {name}")


def test_the_post_run_tools_rule_has_teeth() -> None:
    """Every tool the rule names exists, and the check sees the imports it must forbid."""
    for rel in POST_RUN_TOOLS:
        assert (PACKAGE / rel).is_file(), rel
    assert any(n.startswith("batchflux.runner") for n in absolute_imports("batch.py"))


def test_every_module_the_library_rules_name_exists() -> None:
    """A renamed or split module must not leave an allowance pointing at nothing."""
    for lib, allowed in ALLOWED.items():
        for rel in allowed:
            assert (PACKAGE / rel).is_file(), f"ALLOWED[{lib!r}] names missing {rel}"
            assert any(n == lib or n.startswith(lib + ".") for n in imports(PACKAGE / rel)), (
                f"{rel} no longer imports {lib}")


def test_the_simulator_and_the_runner_meet_only_over_http() -> None:
    runner_side = {"runner", "batch", "apiframe", "store", "report", "runcmd", "review",
                   "merge", "dataset", "plan", "manifest", "expand", "progress", "results",
                   "verify", "resume", "lifecycle", "completion", "limits", "reviewapp"}
    for rel, names in modules().items():
        if rel.startswith("sim/"):
            for name in names:
                parts = name.lstrip(".").split(".")
                assert not (name.startswith("..") and parts[0] in runner_side), (
                    f"{rel} imports {name}")
                assert not (name.startswith("batchflux.") and parts[1] in runner_side)
        elif rel in {"runner.py", "apiframe.py", "store.py"}:
            assert not any("sim" in n.split(".") for n in names), f"{rel} imports the sim"


def test_the_package_type_checks() -> None:
    from mypy import api  # in the test extras: .ci/run installs it

    stdout, stderr, status = api.run([str(PACKAGE), "--no-error-summary",
                                      "--cache-dir", "/tmp/batchflux-mypy-cache"])
    assert status == 0, stdout + stderr


def strict_modules() -> list[str]:
    """The modules pyproject.toml names for ``mypy --strict`` (what .ci/run checks too)."""
    import tomllib

    with open(PACKAGE.parent / "pyproject.toml", "rb") as fh:
        return list(tomllib.load(fh)["tool"]["batchflux"]["strict"])


def test_the_pure_modules_and_the_run_core_type_check_strictly() -> None:
    from mypy import api

    strict = strict_modules()
    assert {"batchflux/models.py", "batchflux/expand.py", "batchflux/limits.py",
            "batchflux/retry.py", "batchflux/lifecycle.py"} <= set(strict)
    stdout, stderr, status = api.run(["--strict", *[str(PACKAGE.parent / m) for m in strict]])
    assert status == 0, stdout + stderr


def test_no_test_skips_itself() -> None:
    """A test that needs a tool gets it from .ci/run and fails without it; none skips."""
    pattern = re.compile(r"pytest\.(skip|importorskip)\(|mark\.skip(if)?\b|mark\.xfail\b")
    found = [f"{path.name}:{number}: {line.strip()}"
             for path in sorted((ROOT / "tests").rglob("*.py")) if path.name != Path(__file__).name
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert not found, "\n".join(found)


def test_ruff_finds_nothing_with_the_chosen_rules() -> None:
    """The rule set in pyproject.toml ([tool.ruff.lint]) over the package, tests and bench:
    what .ci/run checks too, so that the README's test command alone catches a finding."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "batchflux",
                           "tests", "bench"], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"E", "F", "I", "B", "UP", "RUF"} <= set(settings["select"])
