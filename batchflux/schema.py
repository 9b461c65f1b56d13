"""Find, load and apply the JSON Schemas shipped in ``batchflux/schemas/``.

jsonschema lives here and nowhere else. Its errors are translated into
:class:`~batchflux.models.Diagnostic` values placed at the exact source position of the
offending key or value, through a ``locate`` callback supplied by the loader (which knows
the YAML or JSONL positions).

    >>> diagnostics = validate_document({"prompts": []}, "job", file="m.yaml",
    ...                                 locate=lambda path, key: (1, 1))
    >>> [d.field for d in diagnostics]
    ['prompts']
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from .display import plural
from .models import Diagnostic

#: ``locate(path, key)`` returns the 1-based (line, col) of the value at ``path`` (or of its
#: key in the parent mapping when ``key`` is true), falling back to the nearest ancestor.
Locator = Callable[[tuple[str | int, ...], bool], tuple[int, int]]

SCHEMA_NAMES = ("job", "item")


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """The schema ``name`` ("job" or "item") as shipped inside the installed package."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}")
    text = resources.files("batchflux").joinpath("schemas", f"{name}.schema.json").read_text(
        encoding="utf-8"
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(name))


def format_path(path: Sequence[str | int]) -> str:
    """``("prompts", 2, "vars", "color")`` -> ``"prompts[2].vars.color"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validate_document(
    instance: Any,
    schema: str,
    *,
    file: str,
    locate: Locator,
    base_path: tuple[str | int, ...] = (),
) -> list[Diagnostic]:
    """Every schema violation of ``instance`` as a located diagnostic (empty when valid).

    ``base_path`` prefixes field paths (a JSONL line is validated on its own, but its
    diagnostics are still reported relative to the line).
    """
    diagnostics: list[Diagnostic] = []
    for error in _leaf_errors(_validator(schema).iter_errors(instance)):
        diagnostics.extend(_translate(error, file=file, locate=locate, base_path=base_path))
    return sorted(set(diagnostics))


def _leaf_errors(errors: Iterator[ValidationError]) -> Iterator[ValidationError]:
    # if/then and the like wrap the useful errors in ``context``; report those instead.
    for error in errors:
        if error.context and error.validator in ("oneOf", "anyOf"):
            best = jsonschema.exceptions.best_match(error.context)
            if best is not None:
                yield best
                continue
        yield error


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False, default=str)
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {"object": "mapping", "array": "list", "null": "null"}


def _describe(value: Any) -> str:
    """A value as a message names it: its type, then the value itself when that adds
    something (``string "x"``, ``list [1, 2]``); null (an empty YAML value) is named once."""
    if value is None:
        return "an empty value (null)"
    return f"{_json_type(value)} {_show(value)}"


def _translate(
    error: ValidationError, *, file: str, locate: Locator, base_path: tuple[str | int, ...]
) -> Iterator[Diagnostic]:
    path = tuple(error.absolute_path)
    full = base_path + path
    v, value, sch = error.validator, error.instance, error.schema

    def at(p: tuple[str | int, ...], message: str, *, key: bool = False) -> Diagnostic:
        line, col = locate(base_path + p, key)
        return Diagnostic(file, line, col, format_path(base_path + p), message)

    if "propertyNames" in error.absolute_schema_path and isinstance(value, str):
        if v == "minLength":
            yield at(path + (value,), "a name must not be empty", key=True)
            return
        yield at(path + (value,), f"invalid name {_show(value)}: use letters, digits and _ "
                 "(not starting with a digit)", key=True)
        return
    if v == "additionalProperties" and isinstance(value, dict):
        known = list(sch.get("properties", {}))
        for name in value:
            if name in known:
                continue
            hint = difflib.get_close_matches(str(name), known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            if not known:
                yield at(path + (name,), "unexpected field", key=True)
                continue
            yield at(path + (name,), f"unknown field {name!r}{suggestion}", key=True)
        return
    if v == "required":
        missing = [n for n in error.validator_value if isinstance(value, dict) and n not in value]
        for name in missing:
            yield at(path, f"missing required field {name!r}")
        return
    if v == "type":
        wanted = error.validator_value
        names = [wanted] if isinstance(wanted, str) else list(wanted)
        shown = " or ".join(_TYPE_NAMES.get(n, n) for n in names)
        message = f"expected {shown}, got {_describe(value)}"
    elif v == "enum":
        allowed = ", ".join(_show(x) for x in error.validator_value)
        message = f"must be one of {allowed}; got {_show(value)}"
    elif v == "minimum":
        message = f"must be at least {error.validator_value}; got {_show(value)}"
    elif v == "maximum":
        message = f"must be at most {error.validator_value}; got {_show(value)}"
    elif v == "exclusiveMinimum":
        message = f"must be greater than {error.validator_value}; got {_show(value)}"
    elif v == "minLength":
        message = "must not be empty" if error.validator_value == 1 else (
            f"must be at least {plural(error.validator_value, 'character')}")
    elif v == "maxLength":
        message = (f"must be at most {plural(error.validator_value, 'character')}; "
                   f"got {len(value)}")
    elif v == "minItems":
        message = "must not be an empty list" if error.validator_value == 1 else (
            f"must have at least {plural(error.validator_value, 'entry', 'entries')}")
    elif v == "maxItems":
        message = (f"must have at most {plural(error.validator_value, 'entry', 'entries')}; "
                   f"got {len(value)}")
    elif v == "uniqueItems":
        repeated = next((x for i, x in enumerate(value) if x in value[:i]), None)
        message = f"lists {_show(repeated)} more than once"
    elif v == "minProperties":
        message = f"must have at least {plural(error.validator_value, 'key')}"
    elif v == "pattern":
        description = sch.get("description")
        message = f"invalid value {_show(value)}" + (f": {description}" if description else "")
        message = _pattern_message(full, value, sch) or message
    elif v == "propertyNames":
        bad = error.instance
        yield at(path + (bad,),
                 f"invalid name {_show(bad)}: use letters, digits and _ "
                 "(not starting with a digit)",
                 key=True)
        return
    else:
        message = error.message
    yield at(path, message)


def _pattern_message(path: tuple[str | int, ...], value: Any, schema: dict[str, Any]) -> str | None:
    names = [p for p in path if isinstance(p, str)]
    last = names[-1] if names else ""
    if last == "aspect_ratio":
        return (f"invalid aspect ratio {_show(value)}: use \"W:H\" (e.g. \"16:9\"), "
                "\"match_input_image\" or \"custom\"")
    if last == "meta_columns":
        return (f"invalid meta_columns {_show(value)}: give a list of column headers "
                "([sku, category]) or \"all\"")
    if last == "seeds":
        return f"invalid seed range {_show(value)}: use \"A-B\" (e.g. \"1-100\")"
    if last == "id" or (len(path) >= 2 and path[-1] == "id"):
        return (f"invalid id {_show(value)}: 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit")
    return None


def validate_axis_values(
    name: str,
    values: Any,
    *,
    file: str,
    locate: Locator,
    base_path: tuple[str | int, ...],
) -> list[Diagnostic]:
    """Check the list of a zip-group column: a fluxParam axis, or template variable values."""
    job = load_schema("job")
    grid_props = job["properties"]["grid"]["properties"]
    schema = grid_props.get(name) if name not in ("seeds", "repeat", "zip") else None
    if schema is None:
        items = job["properties"]["vars"]["additionalProperties"]["items"]
        schema = {"type": "array", "items": items}
    validator = jsonschema.Draft202012Validator(schema)
    diagnostics: list[Diagnostic] = []
    for error in _leaf_errors(validator.iter_errors(values)):
        diagnostics.extend(_translate(error, file=file, locate=locate, base_path=base_path))
    return diagnostics
