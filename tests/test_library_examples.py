"""Every name ``batchflux/__init__.py`` exports has an example in its docstring, and every
example in the package's docstrings runs and shows what it says (issue 12: "an example for
each name exported"). They run in a copy of ``jobs/`` with a finished simulator run of
``jobs/nightly.yaml`` in ``out/nightly``, as a reader who ran the README would have."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import shutil
from pathlib import Path

import pytest

import batchflux
from batchflux import RunOptions, Simulator, run_batch

ROOT = Path(__file__).resolve().parent.parent
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
EXPORTS = sorted(name for name in batchflux.__all__ if name != "__version__")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of jobs/ and a finished run of jobs/nightly.yaml in out/nightly (made once)."""
    home = tmp_path_factory.mktemp("reader")
    shutil.copytree(ROOT / "jobs", home / "jobs")
    result = run_batch(home / "jobs" / "nightly.yaml",
                       RunOptions(out_dir=str(home / "out" / "nightly")),
                       target=Simulator(job_seconds=0.1))
    assert result.exit_code == 0
    return home


@pytest.fixture
def reader_dir(finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory of a reader who ran the README: a fresh copy for each test, so
    that an example that changes files changes only its own."""
    home = tmp_path / "reader"
    shutil.copytree(finished_run, home, symlinks=True)
    monkeypatch.chdir(home)
    return home


def run_examples(tests: list[doctest.DocTest]) -> doctest.TestResults:
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    return results


@pytest.mark.parametrize("name", EXPORTS)
def test_each_export_has_an_example_that_runs(name: str, reader_dir: Path) -> None:
    obj = getattr(batchflux, name)
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"batchflux.{name} has no example in its docstring"
    finder = doctest.DocTestFinder(recurse=False)
    tests = [t for t in finder.find(obj, name, module=inspect.getmodule(obj)) if t.examples]
    assert tests, name
    skipped = [e.source for t in tests for e in t.examples if e.options.get(doctest.SKIP)]
    assert not skipped, f"batchflux.{name}: examples marked +SKIP run nothing: {skipped}"
    results = run_examples(tests)
    assert results.failed == 0 and results.attempted > 0, name


def package_modules() -> list[str]:
    """Every module of the package but ``__main__`` (importing it runs the command line)."""
    return sorted(info.name for info in pkgutil.walk_packages(batchflux.__path__, "batchflux.")
                  if not info.name.endswith("__main__"))


@pytest.mark.parametrize("module_name", package_modules())
def test_the_examples_of_every_module_run(module_name: str, reader_dir: Path) -> None:
    module = importlib.import_module(module_name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    skipped = [e.source for t in tests for e in t.examples if e.options.get(doctest.SKIP)]
    assert not skipped, f"{module_name}: examples marked +SKIP run nothing: {skipped}"
    results = run_examples(tests)
    assert results.failed == 0, module_name
