"""Issue 12, point 10: docs true to the code. docs/errors.md says what ErrorCategory says;
docs/architecture.md maps every module of the package, and only those, with what each may
import, and its rules are the tables tests/test_architecture.py checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_architecture import (
    ALLOWED,
    PACKAGE,
    POST_RUN_TOOLS,
    PURE,
    RUN_MACHINERY,
    absolute_imports,
)

from batchflux.models import ErrorCategory

ROOT = PACKAGE.parent
ERRORS_DOC = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
ARCHITECTURE_DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def table(text: str, heading: str) -> list[dict[str, str]]:
    """The first Markdown table under ``heading``, as one dict per row (header -> cell)."""
    section = text.split(heading, 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert set(rows[1].replace("|", "").strip()) <= {"-", ":", " "}, "no table under heading"
    body = []
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), f"a cell holds a '|': {line}"
        body.append(dict(zip(header, cells, strict=True)))
    return body


# --------------------------------------------------------------------------------------------
# docs/errors.md


def error_rows() -> dict[str, dict[str, str]]:
    rows = table(ERRORS_DOC, "## Categories")
    names = [row["Category"].strip("`") for row in rows]
    assert len(names) == len(set(names)), "a category has two rows"
    return {name: row for name, row in zip(names, rows, strict=True)}


def test_errors_doc_has_one_row_per_error_category_and_no_other() -> None:
    assert set(error_rows()) == {category.value for category in ErrorCategory}


@pytest.mark.parametrize("category", list(ErrorCategory), ids=lambda c: c.value)
def test_errors_doc_says_what_the_code_says(category: ErrorCategory) -> None:
    row = error_rows()[category.value]
    assert row["Retryable"] == ("yes" if category.retryable else "no")
    assert row["Explanation"] == category.explanation


def test_the_result_schema_knows_exactly_the_error_categories() -> None:
    schema = json.loads((ROOT / "schemas" / "result.schema.json").read_text(encoding="utf-8"))
    variants = schema["properties"]["error"]["oneOf"]
    (error,) = [v for v in variants if v.get("type") == "object"]
    assert error["properties"]["category"]["enum"] == [c.value for c in ErrorCategory]


# --------------------------------------------------------------------------------------------
# docs/architecture.md


def package_modules() -> set[str]:
    """Every module of the package, as a path relative to batchflux/."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if "__pycache__" not in p.parts}


def module_map() -> dict[str, set[str]]:
    """The map's modules, each with the batchflux modules its line says it may import."""
    rows = table(ARCHITECTURE_DOC, "## Module map")
    found: dict[str, set[str]] = {}
    for row in rows:
        module = row["Module"].strip("`")
        assert module not in found, f"{module} has two lines"
        assert row["Holds"], f"{module}: say what it holds"
        allowed = row["May import"]
        found[module] = (set() if allowed == "(nothing of batchflux)"
                         else {name.strip() for name in allowed.split(",")})
    return found


def dotted(module: str) -> str:
    """``manifest/load.py`` -> ``manifest.load``; ``sim/__init__.py`` -> ``sim``."""
    return module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def imported_modules(rel: str) -> set[str]:
    """The modules of batchflux that ``rel`` imports (dotted, relative to batchflux), the
    module itself left out."""
    names = {dotted(m) for m in package_modules()}
    found = set()
    for name in absolute_imports(rel):
        parts = name.split(".")
        if parts[0] != "batchflux":
            continue
        for end in range(len(parts), 1, -1):  # the longest prefix that is a module
            candidate = ".".join(parts[1:end])
            if candidate in names:
                found.add(candidate)
                break
    return found - {dotted(rel)}


def test_the_module_map_lists_every_module_and_only_real_ones() -> None:
    mapped, real = set(module_map()), package_modules()
    assert sorted(real - mapped) == [], "modules missing from docs/architecture.md"
    assert sorted(mapped - real) == [], "docs/architecture.md maps modules that do not exist"


def test_each_module_imports_only_what_its_line_allows() -> None:
    names = {dotted(m) for m in package_modules()}
    wrong = {}
    for module, allowed in module_map().items():
        if module not in package_modules():
            continue  # the test above names it
        unknown = {a for a in allowed if a not in names}
        assert not unknown, f"{module}: the map allows unknown modules {sorted(unknown)}"
        extra = {name for name in imported_modules(module)
                 if not any(name == a or name.startswith(a + ".") for a in allowed)}
        if extra:
            wrong[module] = sorted(extra)
    assert wrong == {}, "imports the map does not list (update docs/architecture.md)"


def test_the_map_check_sees_imports() -> None:
    """The check would prove nothing if it found no imports: it sees the runner's."""
    assert {"lifecycle", "store", "models"} <= imported_modules("runner.py")
    assert "manifest.raw" in imported_modules("manifest/load.py")


def test_the_data_flow_names_only_modules_that_exist() -> None:
    flow = ARCHITECTURE_DOC.split("## Data flow", 1)[1].split("## Layers", 1)[0]
    names = {dotted(m) for m in package_modules()} | {"manifest", "reviewapp", "sim"}
    for name in re.findall(r"\b([a-z_]+(?:/[a-z_]+)?)\.py\b", flow):
        assert name.replace("/", ".") in names, name
    for name in re.findall(r"(?<![\w./])([a-z_]+)/", flow):  # manifest/, not OUT/images/
        assert (PACKAGE / name).is_dir(), name


def rule(number: int) -> str:
    """Rule ``number`` of the section that says what tests/test_architecture.py checks."""
    section = ARCHITECTURE_DOC.split("## Rules the tests enforce", 1)[1].split("\n## ", 1)[0]
    return section.split(f"\n{number}. ", 1)[1].split(f"\n{number + 1}. ", 1)[0]


def quoted(text: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", text))


def test_the_rules_section_says_what_test_architecture_checks() -> None:
    """The doc's rules are the test's own tables: where each library lives, which modules are
    pure, which are post-run tools and which the run machinery they never import."""
    libraries = {"Pillow": "PIL"}
    placed = {}
    for piece in rule(1).split(":", 1)[1].split(";"):
        name = piece.split(" in ", 1)[0].split()[-1]
        placed[libraries.get(name, name)] = quoted(piece)
    assert placed == {lib: {rel.removesuffix(".py") for rel in allowed}
                      for lib, allowed in ALLOWED.items()}
    assert quoted(rule(2).split(")", 1)[0]) == {rel.removesuffix(".py") for rel in PURE}
    tools, machinery = rule(5).split("run machinery:", 1)
    assert quoted(tools) == {rel.removesuffix(".py") for rel in POST_RUN_TOOLS
                             if not rel.startswith("reviewapp/")} | {"reviewapp/"}
    assert quoted(machinery) == set(RUN_MACHINERY)


def test_the_readme_points_at_the_architecture() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/architecture.md" in readme
    assert Path(ROOT / "docs" / "architecture.md").is_file()
