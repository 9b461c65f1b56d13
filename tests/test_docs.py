"""Issue 12, point 10: docs true to the code. docs/errors.md says what ErrorCategory says."""

from __future__ import annotations

import json

import pytest
from test_architecture import PACKAGE

from batchflux.models import ErrorCategory

ROOT = PACKAGE.parent
ERRORS_DOC = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")


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
