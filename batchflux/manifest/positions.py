"""Where a diagnostic goes: field paths, locators and the document a value came from.

Every reader in this package turns what it read into plain values plus a *locator*
(:data:`batchflux.schema.Locator`): ``locate(path, key)`` gives the 1-based ``(line, col)``
of the value at a field path, or of its key. A :class:`Doc` bundles the locator of one parsed
document (a YAML file, one JSONL line, one CSV row) with its file name and directory, so that
any later step can report a problem exactly where the user wrote the value:

    >>> doc = Doc("job.yaml", map_locator({("grid",): (4, 3)}, {}), Path("."))
    >>> str(doc.at(("grid", "seeds"), "empty seed range"))
    'job.yaml:4:3: grid.seeds: empty seed range'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..models import Diagnostic
from ..schema import Locator, format_path

__all__ = ["Doc", "FieldPath", "Position", "json_str", "jsonl_locator", "map_locator"]

#: A path to a value inside a document: mapping keys and list indexes, outermost first.
FieldPath = tuple[str | int, ...]
#: A 1-based (line, column).
Position = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Doc:
    """Where diagnostics for one parsed document (or one JSONL line, or CSV row) go.

    ``dir`` is the directory that relative paths in the document (reference images) are
    resolved against.
    """

    file: str
    locate: Locator
    dir: Path

    def at(self, path: FieldPath, message: str, *, key: bool = False) -> Diagnostic:
        """A diagnostic at the value at ``path`` (or at its key, with ``key=True``)."""
        line, col = self.locate(path, key)
        return Diagnostic(self.file, line, col, format_path(path), message)

    def line_of(self, path: FieldPath) -> int:
        """The line of the value at ``path``."""
        return self.locate(path, False)[0]


def map_locator(values: dict[FieldPath, Position], keys: dict[FieldPath, Position]) -> Locator:
    """A locator over recorded positions: a path's own, else its nearest recorded ancestor's.

    >>> locate = map_locator({(): (1, 1), ("run",): (7, 3)}, {("run",): (7, 1)})
    >>> locate(("run", "rpm"), False), locate(("run",), True)
    ((7, 3), (7, 1))
    """

    def locate(path: FieldPath, key: bool) -> Position:
        if key and path in keys:
            return keys[path]
        probe = tuple(path)
        while probe:
            if probe in values:
                return values[probe]
            probe = probe[:-1]
        return values.get((), (1, 1))

    return locate


def jsonl_locator(line_no: int, text: str) -> Locator:
    """A locator for one JSONL line: the column of a field is found by searching for its key
    (then past it, for the value); 1 when it cannot be found.

    >>> jsonl_locator(3, '{"id": "x", "prompt": 5}')(("prompt",), False)
    (3, 23)
    """

    def locate(path: FieldPath, key: bool) -> Position:
        first = len(text) - len(text.lstrip())
        col, pos = first + 1, 0
        for part in path:
            if isinstance(part, int):
                break
            match = re.compile(re.escape(json_str(part)) + r"\s*:\s*").search(text, pos)
            if match is None:
                break
            col = match.start() + 1
            if not key or part != path[-1]:
                col = match.end() + 1
            pos = match.end()
        return line_no, col

    return locate


def json_str(value: str) -> str:
    """``value`` as a JSON string literal, as it appears in a JSONL line."""
    return json.dumps(value, ensure_ascii=False)
