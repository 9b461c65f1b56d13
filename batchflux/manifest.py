"""Manifest files -> :class:`JobSpec`: read, parse with source positions, validate, resolve.

A manifest is YAML (``*.yaml``/``*.yml``, for people; see ``docs/manifest.md``) or JSONL
(``*.jsonl``, one item per line, for machines). :func:`load_job` reports *every* problem at
once as a :class:`~batchflux.errors.ManifestError` whose diagnostics read
``FILE:LINE:COL: field.path: message`` and point at the exact key or value.

    >>> spec = load_job("jobs/product-photos.yaml")          # doctest: +SKIP
    >>> from batchflux.expand import count_items
    >>> count_items(spec)                                      # doctest: +SKIP
    48

yaml (and Pillow's identify, for reference images) live here; the pure grid logic lives in
:mod:`batchflux.expand`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import Diagnostic, ManifestError
from .expand import (
    VAR_PREFIX,
    Axis,
    PromptEntry,
    canonical_json,
    format_value,
)
from .filenames import FILENAME_PLACEHOLDERS, check_filename_template  # noqa: F401
from .fileutil import sha256_file
from .models import DEFAULT_MODEL, DEFAULT_RUN_OPTIONS, FLUX_PARAM_NAMES, RunOptions, is_remote_ref
from .schema import Locator, format_path, validate_axis_values, validate_document

Path_ = tuple[str | int, ...]

MAX_PROMPT_CHARS = 2000
MAX_INPUT_IMAGES = 5
#: Nodes built from one YAML document, counting every alias expansion: bounds alias bombs.
MAX_YAML_NODES = 1_000_000
_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"})
_RUN_FLOATS = ("rpm", "budget", "job_timeout", "cost_per_image")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated manifest, ready to expand (``batchflux.expand.expand_job``).

    ``options`` holds only what the manifest's ``run:`` block set (unset fields are None);
    merge with ``DEFAULT_RUN_OPTIONS.merged(spec.options).merged(cli_options)``.
    ``image_hashes`` maps each local reference image (absolute path) to
    ``"sha256:<hex>"`` of its content; ``warnings`` are non-fatal findings for ``plan``.
    """

    path: Path
    model: str
    options: RunOptions
    entries: tuple[PromptEntry, ...]
    image_hashes: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[Diagnostic, ...] = ()
    format: str = "yaml"


# --------------------------------------------------------------------------- positions


@dataclass(frozen=True, slots=True)
class _Doc:
    """Where diagnostics for one parsed document (or one JSONL line, or CSV row) go."""

    file: str
    locate: Locator
    dir: Path

    def at(self, path: Path_, message: str, *, key: bool = False) -> Diagnostic:
        line, col = self.locate(path, key)
        return Diagnostic(self.file, line, col, format_path(path), message)

    def line_of(self, path: Path_) -> int:
        return self.locate(path, False)[0]


def _map_locator(values: dict[Path_, tuple[int, int]],
                 keys: dict[Path_, tuple[int, int]]) -> Locator:
    def locate(path: Path_, key: bool) -> tuple[int, int]:
        if key and path in keys:
            return keys[path]
        probe = tuple(path)
        while probe:
            if probe in values:
                return values[probe]
            probe = probe[:-1]
        return values.get((), (1, 1))

    return locate


def _jsonl_locator(line_no: int, text: str) -> Locator:
    """Column of a field in one JSONL line: found by searching for its key, else 1."""

    def locate(path: Path_, key: bool) -> tuple[int, int]:
        first = len(text) - len(text.lstrip())
        col, pos = first + 1, 0
        for part in path:
            if isinstance(part, int):
                break
            match = re.compile(re.escape(_json_str(part)) + r"\s*:\s*").search(text, pos)
            if match is None:
                break
            col = match.start() + 1
            if not key or part != path[-1]:
                col = match.end() + 1
            pos = match.end()
        return line_no, col

    return locate


def _json_str(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------- reading


def _read_text(path: Path, display: str) -> str:
    def fail(message: str, line: int = 0, col: int = 0) -> ManifestError:
        return ManifestError([Diagnostic(display, line, col, "", message)])

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a directory, not a manifest file") from None
    except PermissionError:
        raise fail("permission denied") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise fail("file is empty")
    if b"\x00" in data:
        raise fail("binary file (NUL bytes), not a UTF-8 text manifest")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise fail(f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", line, col) from None


# --------------------------------------------------------------------------- YAML


class _YamlBomb(Exception):
    def __init__(self, node: Node, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


class _YamlBuilder:
    """Build plain values from a composed node tree, recording every key and value position."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[Path_, tuple[int, int]] = {}
        self.keys: dict[Path_, tuple[int, int]] = {}
        self.diagnostics: list[Diagnostic] = []
        self.nodes = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def _count(self, node: Node) -> None:
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise _YamlBomb(node, f"document expands to more than {MAX_YAML_NODES:,} values "
                            "(alias bomb?); refusing")

    def _diag(self, node: Node, path: Path_, message: str) -> None:
        mark = node.start_mark
        self.diagnostics.append(
            Diagnostic(self.file, mark.line + 1, mark.column + 1, format_path(path), message))

    def build(self, node: Node, path: Path_, stack: frozenset[int] = frozenset()) -> Any:
        self._count(node)
        self.values.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if id(node) in stack:
            raise _YamlBomb(node, "recursive alias; refusing")
        inner = stack | {id(node)}
        if node.tag not in _COLLECTION_TAGS:
            self._diag(node, path, f"unsupported YAML tag {node.tag!r}")
        if isinstance(node, SequenceNode):
            return [self.build(child, path + (i,), inner) for i, child in enumerate(node.value)]
        assert isinstance(node, MappingNode)
        result: dict[str, Any] = {}
        for key_node, value_node, explicit in self._pairs(node, path, inner):
            if not isinstance(key_node, ScalarNode):
                self._diag(key_node, path, "mapping keys must be plain strings")
                continue
            key = key_node.value
            if key in result:
                if explicit:
                    first = self.keys.get(path + (key,), (0, 0))
                    self._diag(key_node, path + (key,),
                               f"duplicate key {key!r} (first at line {first[0]})")
                continue
            self.keys[path + (key,)] = (key_node.start_mark.line + 1,
                                        key_node.start_mark.column + 1)
            result[key] = self.build(value_node, path + (key,), inner)
        return result

    def _pairs(self, node: MappingNode, path: Path_,
               stack: frozenset[int]) -> list[tuple[Node, Node, bool]]:
        explicit: list[tuple[Node, Node, bool]] = []
        merged: list[tuple[Node, Node, bool]] = []
        for key_node, value_node in node.value:
            self._count(key_node)
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, MappingNode):
                        self._diag(source, path, "a merge key (<<) needs a mapping")
                        continue
                    if id(source) in stack:
                        raise _YamlBomb(source, "recursive alias; refusing")
                    merged.extend((k, v, False)
                                  for k, v, _ in self._pairs(source, path, stack | {id(source)}))
            else:
                explicit.append((key_node, value_node, True))
        return explicit + merged

    def _scalar(self, node: ScalarNode, path: Path_) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self._diag(node, path, f"unsupported YAML value: {problem}")
            return None
        if isinstance(value, (_dt.date, _dt.datetime)):
            return value.isoformat()
        if isinstance(value, bytes):
            self._diag(node, path, "binary values are not supported")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self._diag(node, path, "must be a finite number")
            return None
        return value


def _parse_yaml(text: str, display: str) -> tuple[Any, Locator, list[Diagnostic]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ManifestError([Diagnostic(display, line, col, "", f"invalid YAML: {problem}")]) \
            from None
    except yaml.YAMLError as exc:
        raise ManifestError([Diagnostic(display, 1, 1, "", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise ManifestError([Diagnostic(display, 1, 1, "", "invalid YAML: nested too deeply")]) \
            from None
    if root is None:
        raise ManifestError([Diagnostic(display, 0, 0, "", "file holds no YAML document")])
    builder = _YamlBuilder(display)
    try:
        document = builder.build(root, ())
    except _YamlBomb as bomb:
        mark = bomb.node.start_mark
        raise ManifestError([Diagnostic(display, mark.line + 1, mark.column + 1, "",
                                        bomb.message)]) from None
    except RecursionError:
        raise ManifestError([Diagnostic(display, 1, 1, "", "invalid YAML: nested too deeply")]) \
            from None
    return document, _map_locator(builder.values, builder.keys), builder.diagnostics


# --------------------------------------------------------------------------- JSONL / CSV


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    text: str
    value: Any  # None when the line did not parse


def _parse_jsonl(text: str, display: str, diagnostics: list[Diagnostic]) -> Iterator[_Line]:
    import json

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        duplicates: list[str] = []

        def pairs(items: list[tuple[str, Any]], _dups: list[str] = duplicates) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in items:
                if k in out:
                    _dups.append(k)
                out[k] = v
            return out

        try:
            value = json.loads(line, object_pairs_hook=pairs, parse_constant=reject_constant)
        except json.JSONDecodeError as exc:
            diagnostics.append(Diagnostic(display, number, exc.colno, "",
                                          f"invalid JSON: {exc.msg}"))
            yield _Line(number, line, None)
            continue
        except ValueError as exc:
            diagnostics.append(Diagnostic(display, number, 1, "", f"invalid JSON: {exc}"))
            yield _Line(number, line, None)
            continue
        for name in duplicates:
            needle = _json_str(name)
            first = line.find(needle)
            second = line.find(needle, first + 1)
            diagnostics.append(Diagnostic(display, number, second + 1 if second >= 0 else 1,
                                          name, f"duplicate key {name!r}"))
        yield _Line(number, line, value)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class _Setting:
    """One fluxParam (or seed/repeat) value set at one level, with where it was set."""

    value: Any  # scalar, tuple of refs, or an axis column (tuple/range) when is_axis
    doc: _Doc
    path: Path_
    is_axis: bool = False


@dataclass(frozen=True, slots=True)
class _Zip:
    doc: _Doc
    path: Path_
    columns: tuple[tuple[str, tuple[Any, ...], Path_], ...]  # (field, values, path)


@dataclass
class _Context:
    """What a whole manifest shares, plus the collector of diagnostics and image refs."""

    diagnostics: list[Diagnostic]
    images: dict[str, list[tuple[_Doc, Path_, str]]] = field(default_factory=dict)
    model: str = DEFAULT_MODEL
    base: dict[str, _Setting] = field(default_factory=dict)  # defaults + grid, resolved
    base_zip: tuple[_Zip, ...] = ()
    vars: dict[str, tuple[Any, _Doc, Path_]] = field(default_factory=dict)

    def error(self, doc: _Doc, path: Path_, message: str, *, key: bool = False) -> None:
        self.diagnostics.append(doc.at(path, message, key=key))


def _resolve_ref(ref: str, doc: _Doc, path: Path_, ctx: _Context) -> str:
    if is_remote_ref(ref):
        return ref
    resolved = os.path.abspath(doc.dir / os.path.expanduser(ref))
    ctx.images.setdefault(resolved, []).append((doc, path, ref))
    return resolved


def _image_setting(value: list[Any], doc: _Doc, path: Path_, ctx: _Context) -> _Setting | None:
    kinds = {isinstance(v, list) for v in value}
    if len(kinds) > 1:
        ctx.error(doc, path, "input_images: give a list of images, or a list of lists "
                  "(an axis), not a mix")
        return None
    if kinds == {True}:
        rows = []
        for i, row in enumerate(value):
            if len(row) > MAX_INPUT_IMAGES:
                ctx.error(doc, path + (i,), f"at most {MAX_INPUT_IMAGES} input images; "
                          f"got {len(row)}")
            rows.append(tuple(_resolve_ref(r, doc, path + (i, j), ctx) for j, r in enumerate(row)))
        return _Setting(tuple(rows), doc, path, is_axis=True)
    if len(value) > MAX_INPUT_IMAGES:
        ctx.error(doc, path, f"at most {MAX_INPUT_IMAGES} input images; got {len(value)}")
    return _Setting(tuple(_resolve_ref(r, doc, path + (i,), ctx) for i, r in enumerate(value)),
                    doc, path)


def _seed_setting(value: Any, doc: _Doc, path: Path_, ctx: _Context) -> _Setting | None:
    """``seeds`` in any of its forms; ``{count}`` without start becomes ``seedcount``."""
    if isinstance(value, list):
        return _Setting(tuple(value), doc, path, is_axis=True)
    if isinstance(value, str):
        low, high = (int(x) for x in value.split("-"))
        if low > high:
            ctx.error(doc, path, f"empty seed range {value!r}: the start is above the end")
            return None
        if high > 2**31 - 1:
            ctx.error(doc, path, f"seed range {value!r} goes above 2147483647")
            return None
        return _Setting(range(low, high + 1), doc, path, is_axis=True)
    count, start = value["count"], value.get("start")
    if start is None:
        return _Setting(count, doc, path)
    if start + count - 1 > 2**31 - 1:
        ctx.error(doc, path, f"seeds {start}..{start + count - 1} go above 2147483647")
        return None
    return _Setting(range(start, start + count), doc, path, is_axis=True)


def _settings(raw: Mapping[str, Any], doc: _Doc, base: Path_, params_base: Path_,
              params: Mapping[str, Any], ctx: _Context) -> dict[str, _Setting]:
    """fluxParams (+ ``seeds``/``repeat``) of one level; lists become axes."""
    out: dict[str, _Setting] = {}
    for name in FLUX_PARAM_NAMES:
        if name not in params:
            continue
        value, path = params[name], params_base + (name,)
        if name == "input_images":
            setting = _image_setting(value, doc, path, ctx)
        elif isinstance(value, list):
            setting = _Setting(tuple(value), doc, path, is_axis=True)
        else:
            setting = _Setting(value, doc, path)
        if setting is not None:
            out[name] = setting
    if "seeds" in raw:
        if "seed" in out:
            ctx.error(doc, base + ("seeds",), "give either seed or seeds, not both", key=True)
        seeds = _seed_setting(raw["seeds"], doc, base + ("seeds",), ctx)
        if seeds is not None:
            out["seedcount" if not seeds.is_axis else "seed"] = seeds
    if "repeat" in raw:
        out["repeat"] = _Setting(raw["repeat"], doc, base + ("repeat",))
    return out


def _zips(raw: Any, doc: _Doc, path: Path_, level: Mapping[str, _Setting],
          ctx: _Context) -> tuple[_Zip, ...]:
    groups: list[_Zip] = []
    seen: dict[str, Path_] = {}
    for g, group in enumerate(raw):
        gpath = path + (g,)
        columns = []
        for name, values in group.items():
            cpath = gpath + (name,)
            field_name = name if name in FLUX_PARAM_NAMES else VAR_PREFIX + name
            diags = validate_axis_values(name if name in FLUX_PARAM_NAMES else "",
                                         values, file=doc.file, locate=doc.locate,
                                         base_path=cpath)
            if diags:
                ctx.diagnostics.extend(diags)
                continue
            if name in level or field_name in seen:
                ctx.error(doc, cpath, f"{name!r} is already an axis or setting at this level",
                          key=True)
                continue
            seen[field_name] = cpath
            if name == "input_images":
                if not all(isinstance(v, list) for v in values):
                    ctx.error(doc, cpath, "input_images in a zip group: each value is a list "
                              "of images")
                    continue
                values = [tuple(_resolve_ref(r, doc, cpath + (i, j), ctx)
                                for j, r in enumerate(v)) for i, v in enumerate(values)]
            columns.append((field_name, tuple(values), cpath))
        lengths = {len(values) for _, values, _ in columns}
        if len(lengths) > 1:
            detail = ", ".join(f"{f.removeprefix(VAR_PREFIX)} has {len(v)}" for f, v, _ in columns)
            ctx.error(doc, gpath, f"zip lists differ in length: {detail}")
            continue
        if columns:
            groups.append(_Zip(doc, gpath, tuple(columns)))
    return tuple(groups)


def _vars(raw: Mapping[str, Any], doc: _Doc, path: Path_,
          ctx: _Context) -> dict[str, tuple[Any, _Doc, Path_]]:
    out: dict[str, tuple[Any, _Doc, Path_]] = {}
    for name, value in raw.items():
        if name in FLUX_PARAM_NAMES:
            ctx.error(doc, path + (name,), f"{name!r} is a fluxParam name; set it as a param, "
                      "or name the variable differently", key=True)
            continue
        out[name] = (value, doc, path + (name,))
    return out


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class _RawEntry:
    doc: _Doc
    path: Path_  # the entry itself
    text: str
    text_path: Path_
    is_template: bool
    id: str | None
    id_path: Path_
    position: int  # 1-based: the derived id is p{position:04d}
    settings: dict[str, _Setting]
    zips: tuple[_Zip, ...] | None  # None: inherit the grid's
    vars: dict[str, tuple[Any, _Doc, Path_]]


def _parse_template(text: str) -> tuple[tuple[tuple[str, str | None], ...], str | None]:
    parts: list[tuple[str, str | None]] = []
    try:
        for literal, name, spec, conversion in string.Formatter().parse(text):
            if name is None:
                parts.append((literal, None))
                continue
            if not name:
                return (), "empty placeholder {} in the template (write {{ and }} for braces)"
            if not name.isidentifier() or spec or conversion:
                return (), (f"invalid placeholder {{{name}{'!' + conversion if conversion else ''}"
                            f"{':' + spec if spec else ''}}}: use {{name}} "
                            "(write {{ and }} for literal braces)")
            parts.append((literal, name))
    except ValueError as exc:
        return (), f"invalid template: {exc} (write {{{{ and }}}} for literal braces)"
    return tuple(parts), None


def _build_entry(raw: _RawEntry, ctx: _Context) -> PromptEntry | None:
    errors_before = len(ctx.diagnostics)
    doc = raw.doc
    # Effective settings: defaults < grid < entry; an entry setting also removes the same
    # field from an inherited zip group.
    settings = {**ctx.base, **raw.settings}
    inherited = raw.zips is None
    zips = list(ctx.base_zip if inherited else raw.zips or ())
    if inherited:
        zips = [
            _Zip(z.doc, z.path, tuple(c for c in z.columns if c[0] not in raw.settings
                                      and not (c[0] == "seed" and "seedcount" in raw.settings)))
            for z in zips
        ]
    else:
        # the entry's own zip fields override inherited plain settings of the same name
        for z in zips:
            for f, _, _ in z.columns:
                if not f.startswith(VAR_PREFIX) and f in ctx.base and f not in raw.settings:
                    settings.pop(f, None)
    variables = {**ctx.vars, **raw.vars}

    if raw.is_template:
        parts, problem = _parse_template(raw.text)
        if problem:
            ctx.error(doc, raw.text_path, problem)
            return None
    else:
        parts = ((raw.text, None),)
    used = [name for _, name in parts if name is not None]
    zip_vars = {f.removeprefix(VAR_PREFIX) for z in zips for f, _, _ in z.columns
                if f.startswith(VAR_PREFIX)}
    known = set(variables) | zip_vars
    for name in dict.fromkeys(used):
        if name not in known:
            listing = ", ".join(sorted(known)) or "none defined"
            ctx.error(doc, raw.text_path, f"unknown template variable {{{name}}} "
                      f"(variables: {listing})")
    for name, (_, vdoc, vpath) in raw.vars.items():
        if name not in used:
            ctx.error(vdoc, vpath, f"variable {name!r} is not used by the template", key=True)
    if not inherited:
        for z in zips:
            for f, _, cpath in z.columns:
                if f.startswith(VAR_PREFIX) and f.removeprefix(VAR_PREFIX) not in used:
                    ctx.error(z.doc, cpath, f"variable {f.removeprefix(VAR_PREFIX)!r} is not "
                              "used by the template", key=True)
    zips = [_Zip(z.doc, z.path, tuple(c for c in z.columns if not c[0].startswith(VAR_PREFIX)
                                      or c[0].removeprefix(VAR_PREFIX) in used)) for z in zips]
    zips = [z for z in zips if z.columns]
    if len(ctx.diagnostics) > errors_before:
        return None

    fixed_vars: dict[str, Any] = {}
    axes: list[Axis] = []
    for name, (value, _, _) in variables.items():
        if name in zip_vars or name not in used:
            continue
        if isinstance(value, list):
            axes.append(Axis(VAR_PREFIX + name, (VAR_PREFIX + name,), (tuple(value),)))
        else:
            fixed_vars[name] = value
    fixed_params: dict[str, Any] = {}
    for name in FLUX_PARAM_NAMES:
        setting = settings.get(name)
        if setting is None or name == "seed":
            continue
        if setting.is_axis:
            axes.append(Axis(name, (name,), (setting.value,)))
        else:
            fixed_params[name] = list(setting.value) if name == "input_images" else setting.value
    for z in zips:
        fields = tuple(f for f, _, _ in z.columns)
        label = fields[0] if len(fields) == 1 else "zip(" + ",".join(
            f.removeprefix(VAR_PREFIX) for f in fields) + ")"
        axes.append(Axis(label, fields, tuple(values for _, values, _ in z.columns)))
    seed = settings.get("seed")
    zip_fields = {f for z in zips for f, _, _ in z.columns}
    if seed is not None and "seed" not in zip_fields:
        if seed.is_axis:
            axes.append(Axis("seed", ("seed",), (seed.value,)))
        else:
            fixed_params["seed"] = seed.value
    repeat_setting = settings.get("repeat")
    repeat = repeat_setting.value if repeat_setting else 1
    if "seedcount" in settings:
        repeat *= settings["seedcount"].value
    has_seed = (seed is not None) or "seed" in zip_fields
    if repeat > 1 and has_seed and "seedcount" not in settings:
        where = repeat_setting or settings["seedcount"]
        ctx.error(where.doc, where.path, "repeat needs derived seeds: drop seed/seeds, or list "
                  "more seeds instead")
    elif "seedcount" in settings and has_seed:
        where = settings["seedcount"]
        ctx.error(where.doc, where.path, "seeds without start derive their seeds; "
                  "it cannot be combined with a fixed seed")

    _check_params(raw, settings, fixed_params, axes, ctx)
    _check_length(raw, parts, fixed_vars, axes, ctx)
    if len(ctx.diagnostics) > errors_before:
        return None
    prompt_id = raw.id or f"p{raw.position:04d}"
    return PromptEntry(
        prompt_id=prompt_id,
        text=raw.text,
        parts=parts,
        is_template=raw.is_template,
        vars=MappingProxyType(fixed_vars),
        params=MappingProxyType(fixed_params),
        axes=tuple(axes),
        repeat=repeat,
        source=f"{doc.file}:{doc.line_of(raw.path)}",
    )


def _values(name: str, fixed: Mapping[str, Any], axes: list[Axis], default: Any) -> list[Any]:
    out: list[Any] = []
    for axis in axes:
        for f, column in zip(axis.fields, axis.columns):
            if f == name:
                out.extend(column)
    if out:
        return out
    return [fixed.get(name, default)]


def _check_params(raw: _RawEntry, settings: Mapping[str, _Setting], fixed: Mapping[str, Any],
                  axes: list[Axis], ctx: _Context) -> None:
    ratios = _values("aspect_ratio", fixed, axes, "1:1")
    ratio_where = settings.get("aspect_ratio")
    for name in ("width", "height"):
        present = [v for v in _values(name, fixed, axes, None) if v is not None]
        where = settings.get(name)
        if present and "custom" not in ratios and where is not None:
            ctx.error(where.doc, where.path, f"{name} is only used with aspect_ratio custom",
                      key=True)
        if "custom" in ratios and not present:
            doc, path = (ratio_where.doc, ratio_where.path) if ratio_where else (raw.doc, raw.path)
            ctx.error(doc, path, f"aspect_ratio custom needs width and height ({name} missing)")
    if "match_input_image" in ratios:
        images = _values("input_images", fixed, axes, ())
        if any(not row for row in images):
            doc, path = (ratio_where.doc, ratio_where.path) if ratio_where else (raw.doc, raw.path)
            ctx.error(doc, path, "aspect_ratio match_input_image needs at least one input image")


def _check_length(raw: _RawEntry, parts: tuple[tuple[str, str | None], ...],
                  fixed_vars: Mapping[str, Any], axes: list[Axis], ctx: _Context) -> None:
    occurrences: dict[str, int] = {}
    low = high = 0
    for literal, name in parts:
        low += len(literal)
        if name is not None:
            occurrences[name] = occurrences.get(name, 0) + 1
    for name, count in occurrences.items():
        if name in fixed_vars:
            low += count * len(format_value(fixed_vars[name]))
    high = low
    for axis in axes:
        var_columns = [(occurrences.get(f.removeprefix(VAR_PREFIX), 0), column)
                       for f, column in zip(axis.fields, axis.columns)
                       if f.startswith(VAR_PREFIX)]
        if not var_columns:
            continue
        sizes = [sum(n * len(format_value(column[i])) for n, column in var_columns)
                 for i in range(len(axis))]
        low += min(sizes)
        high += max(sizes)
    if high > MAX_PROMPT_CHARS:
        what = "is" if low == high else "can be"
        ctx.error(raw.doc, raw.text_path, f"prompt {what} {high} characters"
                  f"{' after substitution' if raw.is_template else ''} "
                  f"(at most {MAX_PROMPT_CHARS})")
    if low < 1:
        ctx.error(raw.doc, raw.text_path, "prompt can be empty after substitution")


# --------------------------------------------------------------------------- sources of entries


def _yaml_entries(prompts: list[Any], doc: _Doc, ctx: _Context,
                  skip: set[int]) -> Iterator[_RawEntry]:
    for i, item in enumerate(prompts):
        path: Path_ = ("prompts", i)
        if i in skip:  # already reported by the schema
            continue
        if isinstance(item, str):
            yield _RawEntry(doc, path, item, path, False, None, path, i + 1, {}, None, {})
            continue
        settings = _settings(item, doc, path, path, item, ctx)
        zips = _zips(item["zip"], doc, path + ("zip",), settings, ctx) if "zip" in item else None
        yield _RawEntry(doc, path, item["text"], path + ("text",), True, item.get("id"),
                        path + ("id",), i + 1, settings, zips,
                        _vars(item.get("vars", {}), doc, path + ("vars",), ctx))


def _jsonl_entries(text: str, display: str, file_dir: Path, ctx: _Context, *,
                   skip: int = 0, limit: int | None = None) -> Iterator[_RawEntry]:
    position = 0
    taken = 0
    for line in _parse_jsonl(text, display, ctx.diagnostics):
        position += 1
        if position <= skip:
            continue
        if limit is not None and taken >= limit:
            break
        taken += 1
        doc = _Doc(display, _jsonl_locator(line.number, line.text), file_dir)
        if line.value is None:
            continue
        diags = validate_document(line.value, "item", file=display, locate=doc.locate)
        if diags:
            ctx.diagnostics.extend(diags)
            continue
        obj = line.value
        params = obj.get("fluxParams", {})
        settings = _settings(obj, doc, (), ("fluxParams",), params, ctx)
        zips = _zips(obj["zip"], doc, ("zip",), settings, ctx) if "zip" in obj else None
        has_zip_vars = any(k not in FLUX_PARAM_NAMES for g in obj.get("zip", []) for k in g)
        yield _RawEntry(doc, (), obj["prompt"], ("prompt",),
                        "vars" in obj or has_zip_vars, obj.get("id"), ("id",), position,
                        settings, zips, _vars(obj.get("vars", {}), doc, ("vars",), ctx))


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _table_entries(text: str, display: str, file_dir: Path, spec: Mapping[str, Any],
                   fmt: str, doc: _Doc, spec_path: Path_, ctx: _Context) -> Iterator[_RawEntry]:
    lines = text.splitlines()
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        ctx.error(doc, spec_path, f"{display}: no header row")
        return
    text_column = spec.get("text_column", "prompt")
    id_column = spec.get("id_column")
    columns = {name: i for i, name in enumerate(header)}
    for key, column in (("text_column", text_column), ("id_column", id_column)):
        if column is not None and column not in columns:
            at = spec_path + (key,) if key in spec else spec_path
            ctx.error(doc, at, f"no column {column!r} in {display} "
                      f"(columns: {', '.join(header)})")
    if text_column not in columns or (id_column is not None and id_column not in columns):
        return
    skip, limit = spec.get("skip", 0), spec.get("limit")
    position = taken = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            ctx.diagnostics.append(Diagnostic(display, reader.line_num, 1, "", f"invalid row: {exc}"))
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

        def cell_locator(_line: int = line_no, _raw: str = raw_line,
                         _row: list[str] = row) -> Locator:
            def locate(path: Path_, key: bool) -> tuple[int, int]:
                name = path[0] if path else None
                if isinstance(name, str) and name in columns and columns[name] < len(_row):
                    found = _raw.find(_row[columns[name]]) if _row[columns[name]] else -1
                    return _line, found + 1 if found >= 0 else 1
                return _line, 1
            return locate

        row_doc = _Doc(display, cell_locator(), file_dir)
        if len(row) <= columns[text_column]:
            ctx.error(row_doc, (), f"row has no {text_column!r} column")
            continue
        prompt = row[columns[text_column]].strip()
        if not prompt:
            ctx.error(row_doc, (text_column,), "empty prompt")
            continue
        row_id = None
        if id_column is not None:
            row_id = row[columns[id_column]].strip() if len(row) > columns[id_column] else ""
            if not _ID_RE.match(row_id):
                ctx.error(row_doc, (id_column,), f"invalid id {row_id!r}: 1-64 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
                continue
        yield _RawEntry(row_doc, (text_column,), prompt, (text_column,), False, row_id,
                        (id_column or text_column,), position, {}, None, {})


def _file_entries(spec: Any, doc: _Doc, ctx: _Context) -> Iterator[_RawEntry]:
    path: Path_ = ("prompts_file",)
    if isinstance(spec, str):
        spec = {"path": spec}
    rel = spec["path"]
    display = os.path.normpath(os.path.join(os.path.dirname(doc.file), rel))
    target = doc.dir / rel
    fmt = spec.get("format") or {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv",
                                 ".tab": "tsv"}.get(target.suffix.lower())
    if fmt is None:
        ctx.error(doc, path + ("path",) if "path" in spec else path,
                  f"cannot tell the format of {rel!r}: use .jsonl, .csv or .tsv, or set format")
        return
    if fmt == "jsonl" and ("text_column" in spec or "id_column" in spec):
        ctx.error(doc, path, "text_column and id_column are for CSV/TSV files")
        return
    try:
        text = _read_text(target, display)
    except ManifestError as exc:
        for d in exc.diagnostics:
            ctx.error(doc, path + ("path",), f"{display}: {d.message}")
        return
    if fmt == "jsonl":
        yield from _jsonl_entries(text, display, target.parent, ctx,
                                  skip=spec.get("skip", 0), limit=spec.get("limit"))
    else:
        yield from _table_entries(text, display, target.parent, spec, fmt, doc, path, ctx)


# --------------------------------------------------------------------------- load_job


def load_job(path: str | os.PathLike[str], *, max_items: int | None = None) -> JobSpec:
    """Read, validate and resolve a manifest (YAML, or JSONL by its ``.jsonl`` suffix).

    ``max_items`` overrides the manifest's ``run.max_items`` guard (default
    ``DEFAULT_RUN_OPTIONS.max_items``). Raises :class:`ManifestError` carrying every
    diagnostic found, sorted; never a traceback for bad input.
    """
    manifest = Path(path)
    display = os.fspath(path)
    text = _read_text(manifest, display)
    ctx = _Context(diagnostics=[])
    if manifest.suffix.lower() == ".jsonl":
        raws = list(_jsonl_entries(text, display, manifest.parent, ctx))
        spec_format, options, size_doc = "jsonl", RunOptions(), None
    else:
        document, locate, yaml_diags = _parse_yaml(text, display)
        ctx.diagnostics.extend(yaml_diags)
        doc = _Doc(display, locate, manifest.parent)
        reported = {(d.line, d.col) for d in yaml_diags}
        schema_diags = [d for d in validate_document(document, "job", file=display, locate=locate)
                        if (d.line, d.col) not in reported]
        ctx.diagnostics.extend(schema_diags)
        if any(not _is_entry_field(d.field) for d in schema_diags) or yaml_diags:
            raise ManifestError(ctx.diagnostics)
        bad_entries = {_entry_index(d.field) for d in schema_diags}
        raws = list(_yaml_job(document, doc, ctx, bad_entries))
        # Which template variables the prompts use, for {vars.NAME} in file names; unknown
        # while other entries are in error (a prompt that failed may be the one using it).
        used = None if ctx.diagnostics else _used_variables(raws)
        options = _run_options(document.get("run", {}), doc, ctx, variables=used)
        spec_format = "yaml"
        size_doc = (doc, ("grid",) if "grid" in document else
                    ("prompts",) if "prompts" in document else ("prompts_file",))

    entries: list[PromptEntry] = []
    for raw in raws:
        entry = _build_entry(raw, ctx)
        if entry is not None:
            entries.append(entry)
    _check_ids(raws, ctx)
    image_hashes = _check_images(ctx)
    total = sum(entry.size for entry in entries)
    guard = max_items if max_items is not None else (options.max_items or
                                                     DEFAULT_RUN_OPTIONS.max_items or 0)
    if guard and total > guard:
        message = (f"the grid expands to {total:,} items, over max_items {guard:,} "
                   "(set run.max_items or pass --max-items to allow it)")
        if size_doc is None:
            ctx.diagnostics.append(Diagnostic(display, 1, 1, "", message))
        else:
            ctx.error(size_doc[0], size_doc[1], message, key=True)
    if not raws and not ctx.diagnostics:
        ctx.diagnostics.append(Diagnostic(display, 0, 0, "", "no prompts"))
    if ctx.diagnostics:
        raise ManifestError(ctx.diagnostics)
    return JobSpec(
        path=manifest,
        model=ctx.model,
        options=options,
        entries=tuple(entries),
        image_hashes=MappingProxyType(image_hashes),
        warnings=tuple(sorted(_duplicate_entries(entries))),
        format=spec_format,
    )


def _is_entry_field(field_path: str) -> bool:
    return re.match(r"^prompts\[\d+\]", field_path) is not None


def _entry_index(field_path: str) -> int:
    match = re.match(r"^prompts\[(\d+)\]", field_path)
    return int(match.group(1)) if match else -1


def _yaml_job(document: Mapping[str, Any], doc: _Doc, ctx: _Context,
              bad_entries: set[int]) -> Iterator[_RawEntry]:
    ctx.model = document.get("model", DEFAULT_MODEL)
    defaults = document.get("defaults", {})
    grid = document.get("grid", {})
    grid_settings = _settings(grid, doc, ("grid",), ("grid",), grid, ctx)
    ctx.base = {**_settings({}, doc, ("defaults",), ("defaults",), defaults, ctx),
                **grid_settings}
    if "zip" in grid:
        ctx.base_zip = _zips(grid["zip"], doc, ("grid", "zip"), grid_settings, ctx)
    ctx.vars = _vars(document.get("vars", {}), doc, ("vars",), ctx)
    has_prompts, has_file = "prompts" in document, "prompts_file" in document
    if has_prompts and has_file:
        ctx.error(doc, ("prompts_file",), "give prompts or prompts_file, not both", key=True)
        return
    if not has_prompts and not has_file:
        ctx.error(doc, (), "missing prompts (or prompts_file)")
        return
    if has_prompts:
        yield from _yaml_entries(document["prompts"], doc, ctx, bad_entries)
    else:
        yield from _file_entries(document["prompts_file"], doc, ctx)


def _used_variables(raws: list[_RawEntry]) -> set[str] | None:
    """The template variables the prompts use (None when a template does not parse)."""
    used: set[str] = set()
    for raw in raws:
        if raw.is_template:
            parts, problem = _parse_template(raw.text)
            if problem:
                return None
            used.update(name for _, name in parts if name is not None)
    return used


def _run_options(run: Mapping[str, Any], doc: _Doc, ctx: _Context, *,
                 variables: set[str] | None = None) -> RunOptions:
    values: dict[str, Any] = {k: (float(v) if k in _RUN_FLOATS else v) for k, v in run.items()}
    template = values.get("filename_template")
    if template is not None:
        problem = check_filename_template(str(template), variables=variables)
        if problem:
            ctx.error(doc, ("run", "filename_template"), problem)
    return RunOptions(**values)


def _check_ids(raws: list[_RawEntry], ctx: _Context) -> None:
    seen: dict[str, _RawEntry] = {}
    for raw in raws:
        prompt_id = raw.id or f"p{raw.position:04d}"
        first = seen.get(prompt_id)
        if first is None:
            seen[prompt_id] = raw
            continue
        where = f"{first.doc.file}:{first.doc.line_of(first.path)}"
        doc, path = (raw.doc, raw.id_path) if raw.id else (raw.doc, raw.path)
        ctx.error(doc, path, f"duplicate id {prompt_id!r} (first used at {where})")


def _check_images(ctx: _Context) -> dict[str, str]:
    from PIL import Image, UnidentifiedImageError

    hashes: dict[str, str] = {}
    for resolved, uses in ctx.images.items():
        problem = None
        try:
            with Image.open(resolved) as image:
                image.size  # noqa: B018 - identify only; decoding is the API's job
            hashes[resolved] = "sha256:" + sha256_file(resolved)
        except FileNotFoundError:
            problem = "no such file"
        except IsADirectoryError:
            problem = "is a directory"
        except UnidentifiedImageError:
            problem = "not an image Pillow can identify"
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            problem = f"cannot read image: {exc}"
        if problem:
            for doc, path, ref in uses:
                ctx.error(doc, path, f"input image {ref!r}: {problem}")
    return hashes


def _duplicate_entries(entries: list[PromptEntry]) -> Iterator[Diagnostic]:
    """Entries that ask for exactly the same requests as an earlier one (cheap, by entry)."""
    seen: dict[str, PromptEntry] = {}
    for entry in entries:
        shape = canonical_json({
            "text": entry.text, "template": entry.is_template, "vars": dict(entry.vars),
            "params": dict(entry.params), "repeat": entry.repeat,
            "axes": [[a.fields, [list(c) if not isinstance(c, range) else [c.start, c.stop]
                                 for c in a.columns]] for a in entry.axes],
        })
        first = seen.setdefault(shape, entry)
        if first is not entry:
            file, _, line = (entry.source or "").rpartition(":")
            yield Diagnostic(file, int(line or 0), 1, entry.prompt_id,
                             f"same requests as {first.prompt_id} ({first.source}): "
                             "its items have the same keys and would be generated once")

