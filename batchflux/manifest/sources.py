"""Where prompts come from: a YAML ``prompts`` list, JSONL lines, CSV/TSV rows.

Each source yields :class:`~batchflux.manifest.raw.RawEntry` values, one per prompt, each
with a :class:`~batchflux.manifest.positions.Doc` that places its diagnostics in the file the
prompt was written in (a JSONL line, a CSV row: not the manifest that names the file).

``prompts_file`` names a JSONL, CSV or TSV file relative to the manifest. A CSV/TSV file has
a header row; ``text_column`` names the prompt column, ``id_column`` an optional id column and
``meta_columns`` the columns (a list, or ``all``: every named column but the text column)
copied into each item's ``meta``. Text, id and meta cells are trimmed of leading and trailing
whitespace; a row whose cells are all blank is skipped. A JSONL item (or a YAML entry)
carries its own ``meta`` object instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ManifestError
from ..models import FLUX_PARAM_NAMES, Diagnostic
from ..schema import Locator, validate_document
from .positions import Doc, FieldPath, Position, json_str, jsonl_locator
from .raw import Context, RawEntry
from .settings import read_settings, read_vars, read_zips
from .text import read_text

__all__ = ["JsonlLine", "file_entries", "jsonl_entries", "parse_jsonl", "table_entries",
           "yaml_entries"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
#: The value of ``meta_columns`` that takes every named column except the text column.
ALL_COLUMNS = "all"


# --------------------------------------------------------------------------- YAML prompts


def yaml_entries(prompts: list[Any], doc: Doc, ctx: Context,
                 skip: set[int]) -> Iterator[RawEntry]:
    """The entries of a YAML ``prompts`` list, except those at the indexes in ``skip``
    (already reported by the schema)."""
    for i, item in enumerate(prompts):
        path: FieldPath = ("prompts", i)
        if i in skip:
            continue
        if isinstance(item, str):
            yield RawEntry(doc, path, item, path, False, None, path, i + 1)
            continue
        settings = read_settings(item, doc, path, path, item, ctx)
        zips = read_zips(item["zip"], doc, path + ("zip",), settings, ctx) if "zip" in item \
            else None
        yield RawEntry(doc, path, item["text"], path + ("text",), True, item.get("id"),
                       path + ("id",), i + 1, settings, zips,
                       read_vars(item.get("vars", {}), doc, path + ("vars",), ctx),
                       item.get("meta", {}))


# --------------------------------------------------------------------------- JSONL


@dataclass(frozen=True, slots=True)
class JsonlLine:
    """One non-blank line of a JSONL file; ``value`` is None when it did not parse."""

    number: int
    text: str
    value: Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_line(number: int, line: str, display: str,
                diagnostics: list[Diagnostic]) -> JsonlLine:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                duplicates.append(k)
            out[k] = v
        return out

    try:
        value = json.loads(line, object_pairs_hook=pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        diagnostics.append(Diagnostic(display, number, exc.colno, "", f"invalid JSON: {exc.msg}"))
        return JsonlLine(number, line, None)
    except ValueError as exc:
        diagnostics.append(Diagnostic(display, number, 1, "", f"invalid JSON: {exc}"))
        return JsonlLine(number, line, None)
    for name in duplicates:
        needle = json_str(name)
        first = line.find(needle)
        second = line.find(needle, first + 1)
        diagnostics.append(Diagnostic(display, number, second + 1 if second >= 0 else 1,
                                      name, f"duplicate key {name!r}"))
    return JsonlLine(number, line, value)


def parse_jsonl(text: str, display: str, diagnostics: list[Diagnostic]) -> Iterator[JsonlLine]:
    """Every non-blank line of ``text`` parsed as JSON (NaN and Infinity refused, duplicate
    keys reported); a line that does not parse is yielded with value None and diagnosed."""
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if line.strip():
            yield _parse_line(number, line, display, diagnostics)


def _jsonl_entry(obj: Mapping[str, Any], doc: Doc, position: int, ctx: Context) -> RawEntry:
    params = obj.get("fluxParams", {})
    settings = read_settings(obj, doc, (), ("fluxParams",), params, ctx)
    zips = read_zips(obj["zip"], doc, ("zip",), settings, ctx) if "zip" in obj else None
    has_zip_vars = any(k not in FLUX_PARAM_NAMES for g in obj.get("zip", []) for k in g)
    return RawEntry(doc, (), obj["prompt"], ("prompt",), "vars" in obj or has_zip_vars,
                    obj.get("id"), ("id",), position, settings, zips,
                    read_vars(obj.get("vars", {}), doc, ("vars",), ctx), obj.get("meta", {}))


def jsonl_entries(text: str, display: str, file_dir: Path, ctx: Context, *,
                  skip: int = 0, limit: int | None = None) -> Iterator[RawEntry]:
    """The entries of a JSONL text (a ``.jsonl`` manifest or prompts file), each line checked
    against ``item.schema.json``; ``skip`` and ``limit`` count non-blank lines."""
    position = taken = 0
    for line in parse_jsonl(text, display, ctx.diagnostics):
        position += 1
        if position <= skip:
            continue
        if limit is not None and taken >= limit:
            break
        taken += 1
        doc = Doc(display, jsonl_locator(line.number, line.text), file_dir)
        if line.value is None:
            continue
        diags = validate_document(line.value, "item", file=display, locate=doc.locate)
        if diags:
            ctx.diagnostics.extend(diags)
            continue
        yield _jsonl_entry(line.value, doc, position, ctx)


# --------------------------------------------------------------------------- CSV / TSV


@dataclass(frozen=True, slots=True)
class _Table:
    """A CSV/TSV prompts file's header and the columns the manifest asked for."""

    display: str
    header: list[str]
    columns: dict[str, int]  # header name -> index (the last one, for a repeated name)
    text_column: str
    id_column: str | None
    meta: tuple[tuple[str, int], ...]  # meta name -> index


def _reader(text: str, fmt: str) -> Any:
    if fmt == "tsv":
        return csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(io.StringIO(text))


def _no_column(display: str, header: Sequence[str], column: str) -> str:
    return f"no column {column!r} in {display} (columns: {', '.join(header)})"


def _meta_columns(spec: Mapping[str, Any], header: list[str], display: str, text_column: str,
                  doc: Doc, spec_path: FieldPath, ctx: Context) -> tuple[tuple[str, int], ...]:
    """The ``meta_columns`` of ``spec`` as (name, index) pairs; an unknown or repeated
    column is a diagnostic at the name that asked for it."""
    wanted = spec.get("meta_columns")
    if wanted is None:
        return ()
    path = spec_path + ("meta_columns",)
    if wanted == ALL_COLUMNS:
        names = [(name, path) for name in dict.fromkeys(header)
                 if name.strip() and name != text_column]
    else:
        names = [(name, path + (k,)) for k, name in enumerate(wanted)]
    out: list[tuple[str, int]] = []
    for name, at in names:
        found = [i for i, column in enumerate(header) if column == name]
        if not found:
            ctx.error(doc, at, _no_column(display, header, name))
        elif len(found) > 1:
            ctx.error(doc, at, f"column {name!r} appears {len(found)} times in the header of "
                      f"{display}: a meta column needs a header of its own")
        else:
            out.append((name, found[0]))
    return tuple(out)


def _table(reader: Any, display: str, spec: Mapping[str, Any], doc: Doc,
           spec_path: FieldPath, ctx: Context) -> _Table | None:
    """Read the header row and check the columns the manifest names (None: cannot go on)."""
    try:
        header: list[str] = next(reader)
    except (StopIteration, csv.Error):
        ctx.error(doc, spec_path, f"{display}: no header row")
        return None
    text_column = spec.get("text_column", "prompt")
    id_column = spec.get("id_column")
    columns = {name: i for i, name in enumerate(header)}
    for key, column in (("text_column", text_column), ("id_column", id_column)):
        if column is not None and column not in columns:
            at = spec_path + (key,) if key in spec else spec_path
            ctx.error(doc, at, _no_column(display, header, column))
    errors = len(ctx.diagnostics)
    meta = _meta_columns(spec, header, display, text_column, doc, spec_path, ctx)
    if text_column not in columns or (id_column is not None and id_column not in columns) \
            or ctx.errors_since(errors):
        return None
    return _Table(display, header, columns, text_column, id_column, meta)


def _cell_locator(table: _Table, line: int, raw_line: str, row: list[str]) -> Locator:
    """A locator for one row: a column name finds its cell's text in the raw line."""

    def locate(path: FieldPath, key: bool) -> Position:
        name = path[0] if path else None
        if isinstance(name, str) and name in table.columns and table.columns[name] < len(row):
            cell = row[table.columns[name]]
            found = raw_line.find(cell) if cell else -1
            return line, found + 1 if found >= 0 else 1
        return line, 1

    return locate


def _cell(row: list[str], index: int) -> str:
    """The trimmed cell at ``index``; a short row's missing cells are empty."""
    return row[index].strip() if index < len(row) else ""


def _row_entry(table: _Table, row: list[str], row_doc: Doc, position: int,
               ctx: Context) -> RawEntry | None:
    """The entry of one data row, or None when its prompt or id is refused."""
    text_column, id_column = table.text_column, table.id_column
    if len(row) <= table.columns[text_column]:
        ctx.error(row_doc, (), f"row has no {text_column!r} column")
        return None
    prompt = row[table.columns[text_column]].strip()
    if not prompt:
        ctx.error(row_doc, (text_column,), "empty prompt")
        return None
    row_id = None
    if id_column is not None:
        row_id = _cell(row, table.columns[id_column])
        if not _ID_RE.match(row_id):
            ctx.error(row_doc, (id_column,), f"invalid id {row_id!r}: 1-64 letters, digits, "
                      "'.', '_' or '-', starting with a letter or digit")
            return None
    meta = {name: _cell(row, index) for name, index in table.meta}
    return RawEntry(row_doc, (text_column,), prompt, (text_column,), False, row_id,
                    (id_column or text_column,), position, meta=meta)


def table_entries(text: str, display: str, file_dir: Path, spec: Mapping[str, Any],
                  fmt: str, doc: Doc, spec_path: FieldPath, ctx: Context) -> Iterator[RawEntry]:
    """The entries of a CSV or TSV text (``fmt``), one per non-blank data row, as the
    ``prompts_file`` mapping ``spec`` (at ``spec_path`` of ``doc``) describes."""
    lines = text.splitlines()
    reader = _reader(text, fmt)
    table = _table(reader, display, spec, doc, spec_path, ctx)
    if table is None:
        return
    skip, limit = spec.get("skip", 0), spec.get("limit")
    position = taken = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            ctx.diagnostics.append(Diagnostic(display, reader.line_num, 1, "",
                                              f"invalid row: {exc}"))
            break
        line_no = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        position += 1
        if position <= skip:
            continue
        if limit is not None and taken >= limit:
            break
        taken += 1
        raw_line = lines[line_no - 1] if 0 < line_no <= len(lines) else ""
        row_doc = Doc(display, _cell_locator(table, line_no, raw_line, row), file_dir)
        entry = _row_entry(table, row, row_doc, position, ctx)
        if entry is not None:
            yield entry


# --------------------------------------------------------------------------- prompts_file


def file_entries(spec: Any, doc: Doc, ctx: Context) -> Iterator[RawEntry]:
    """The entries of the ``prompts_file`` of a YAML manifest (a path, or a mapping with
    ``path``, ``format``, ``text_column``, ``id_column``, ``meta_columns``, ``skip``,
    ``limit``)."""
    path: FieldPath = ("prompts_file",)
    if isinstance(spec, str):
        spec = {"path": spec}
    rel = spec["path"]
    display = os.path.normpath(os.path.join(os.path.dirname(doc.file), rel))
    target = doc.dir / rel
    fmt = spec.get("format") or _FORMATS_BY_SUFFIX.get(target.suffix.lower())
    if fmt is None:
        ctx.error(doc, path + ("path",) if "path" in spec else path,
                  f"cannot tell the format of {rel!r}: use .jsonl, .csv or .tsv, or set format")
        return
    if fmt == "jsonl" and ("text_column" in spec or "id_column" in spec):
        ctx.error(doc, path, "text_column and id_column are for CSV/TSV files")
        return
    if fmt == "jsonl" and "meta_columns" in spec:
        ctx.error(doc, path + ("meta_columns",), "meta_columns is for CSV/TSV files "
                  "(a JSONL item carries its own \"meta\")", key=True)
        return
    try:
        text = read_text(target, display)
    except ManifestError as exc:
        for d in exc.diagnostics:
            ctx.error(doc, path + ("path",), f"{display}: {d.message}")
        return
    if fmt == "jsonl":
        yield from jsonl_entries(text, display, target.parent, ctx,
                                 skip=spec.get("skip", 0), limit=spec.get("limit"))
    else:
        yield from table_entries(text, display, target.parent, spec, fmt, doc, path, ctx)
