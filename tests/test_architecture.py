"""The module boundaries of DESIGN.md section 3, and the type checker, as tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batchflux"

#: Each third-party library lives in as few modules as possible, so replacing one touches
#: one place. A new import of one of these elsewhere is a design decision: make it here.
ALLOWED = {
    "httpx": {"apiframe.py", "batch.py", "sim/app.py", "sim/faults.py", "sim/webhooks.py"},
    "yaml": {"manifest.py"},
    "jsonschema": {"schema.py"},
    "aiofiles": {"store.py"},
    "PIL": {"imagecheck.py", "manifest.py", "review.py", "sim/render.py"},
    "rich": {"report.py", "review.py"},
    "starlette": {"sim/app.py", "sim/faults.py", "reviewapp/app.py"},
    "uvicorn": {"sim/serve.py", "reviewapp/serve.py"},
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


def test_the_simulator_and_the_runner_meet_only_over_http() -> None:
    runner_side = {"runner", "batch", "apiframe", "store", "report", "runcmd", "review",
                   "merge", "dataset", "plan", "manifest", "expand"}
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
    api = pytest.importorskip("mypy.api", reason="mypy is in the dev extras only")
    stdout, stderr, status = api.run([str(PACKAGE), "--no-error-summary",
                                      "--cache-dir", "/tmp/batchflux-mypy-cache"])
    assert status == 0, stdout + stderr
