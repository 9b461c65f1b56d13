"""Raw entries -> :class:`~batchflux.models.PromptEntry`: effective settings, template
variables, axes, seeds and repeat, checked against each other.

Precedence is defaults < grid < the entry. An entry setting also removes the same field from
an inherited ``grid.zip`` group, and an entry's own ``zip`` replaces the grid's (its fields
then override inherited plain settings of the same name). What a schema cannot check is
checked here: every ``{name}`` of a template is defined and every variable an entry defines
is used; ``repeat`` and derived seeds do not meet fixed seeds; ``custom`` sizes and
``match_input_image`` have what they need; the prompt fits in 1-2000 characters after
substitution (checked by arithmetic over the axes, never by expanding them). Checks across
entries (repeated ids, entries that ask for the same requests) are here too.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ..expand import VAR_PREFIX, canonical_json, format_value
from ..models import FLUX_PARAM_NAMES, Axis, Diagnostic, PromptEntry
from .raw import Context, RawEntry, Setting, VarSetting, Zip

__all__ = ["MAX_PROMPT_CHARS", "Parts", "build_entry", "check_ids", "duplicate_entries",
           "parse_template", "used_variables"]

MAX_PROMPT_CHARS = 2000

#: A parsed template: (literal text, variable name or None) pairs.
Parts = tuple[tuple[str, str | None], ...]


def parse_template(text: str) -> tuple[Parts, str | None]:
    """``text`` split into (literal, variable) parts, or ``((), problem)`` when it does not
    parse (an empty or invalid placeholder, an unmatched brace).

    >>> parse_template("a {color} mug, {{braces}}")
    ((('a ', 'color'), (' mug, {', None), ('braces}', None)), None)
    """
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


def used_variables(raws: Sequence[RawEntry]) -> set[str] | None:
    """The template variables the prompts use (None when a template does not parse)."""
    used: set[str] = set()
    for raw in raws:
        if raw.is_template:
            parts, problem = parse_template(raw.text)
            if problem:
                return None
            used.update(name for _, name in parts if name is not None)
    return used


# --------------------------------------------------------------------------- one entry


def build_entry(raw: RawEntry, ctx: Context) -> PromptEntry | None:
    """The resolved entry of ``raw``, or None when it has problems (reported to ``ctx``)."""
    errors_before = len(ctx.diagnostics)
    settings, zips, inherited = _effective_settings(raw, ctx)
    variables = {**ctx.vars, **raw.vars}
    parts = _template_parts(raw, ctx)
    if parts is None:
        return None
    used = [name for _, name in parts if name is not None]
    _check_variables(raw, variables, zips, used, inherited=inherited, ctx=ctx)
    zips = _without_unused_variables(zips, used)
    if ctx.errors_since(errors_before):
        return None
    fixed_vars, axes = _variable_axes(variables, zips, used)
    fixed_params, param_axes = _param_axes(settings, zips)
    axes.extend(param_axes)
    repeat = _repeat(settings, zips, ctx)
    _check_params(raw, settings, fixed_params, axes, ctx)
    _check_length(raw, parts, fixed_vars, axes, ctx)
    if ctx.errors_since(errors_before):
        return None
    return PromptEntry(
        prompt_id=raw.prompt_id,
        text=raw.text,
        parts=parts,
        is_template=raw.is_template,
        vars=MappingProxyType(fixed_vars),
        params=MappingProxyType(fixed_params),
        axes=tuple(axes),
        repeat=repeat,
        source=f"{raw.doc.file}:{raw.doc.line_of(raw.path)}",
        meta=MappingProxyType(dict(raw.meta)),
    )


def _effective_settings(raw: RawEntry, ctx: Context) -> tuple[dict[str, Setting], list[Zip], bool]:
    """The entry's settings over the manifest's, its zip groups, and whether they are the
    grid's (inherited)."""
    settings = {**ctx.base, **raw.settings}
    if raw.zips is None:
        # an entry setting removes the same field from an inherited zip group
        drop = set(raw.settings) | ({"seed"} if "seedcount" in raw.settings else set())
        return settings, [z.without(drop) for z in ctx.base_zip], True
    # the entry's own zip fields override inherited plain settings of the same name
    for z in raw.zips:
        for f, _, _ in z.columns:
            if not f.startswith(VAR_PREFIX) and f in ctx.base and f not in raw.settings:
                settings.pop(f, None)
    return settings, list(raw.zips), False


def _template_parts(raw: RawEntry, ctx: Context) -> Parts | None:
    """The parsed prompt (a literal prompt is one part), or None when it does not parse."""
    if not raw.is_template:
        return ((raw.text, None),)
    parts, problem = parse_template(raw.text)
    if problem:
        ctx.error(raw.doc, raw.text_path, problem)
        return None
    return parts


def _zip_variables(zips: Sequence[Zip]) -> set[str]:
    return {f.removeprefix(VAR_PREFIX) for z in zips for f, _, _ in z.columns
            if f.startswith(VAR_PREFIX)}


def _check_variables(raw: RawEntry, variables: Mapping[str, VarSetting], zips: Sequence[Zip],
                     used: Sequence[str], *, inherited: bool, ctx: Context) -> None:
    """Every variable the template uses is defined; every one the entry defines is used."""
    known = set(variables) | _zip_variables(zips)
    for name in dict.fromkeys(used):
        if name not in known:
            listing = ", ".join(sorted(known)) or "none defined"
            ctx.error(raw.doc, raw.text_path, f"unknown template variable {{{name}}} "
                      f"(variables: {listing})")
    for name, (_, vdoc, vpath) in raw.vars.items():
        if name not in used:
            ctx.error(vdoc, vpath, f"variable {name!r} is not used by the template", key=True)
    if inherited:
        return
    for z in zips:
        for f, _, cpath in z.columns:
            if f.startswith(VAR_PREFIX) and f.removeprefix(VAR_PREFIX) not in used:
                ctx.error(z.doc, cpath, f"variable {f.removeprefix(VAR_PREFIX)!r} is not "
                          "used by the template", key=True)


def _without_unused_variables(zips: Sequence[Zip], used: Sequence[str]) -> list[Zip]:
    """The zip groups without columns of variables the template does not use; groups left
    empty are dropped."""
    unused = {f for z in zips for f, _, _ in z.columns
              if f.startswith(VAR_PREFIX) and f.removeprefix(VAR_PREFIX) not in used}
    kept = [z.without(unused) for z in zips]
    return [z for z in kept if z.columns]


def _variable_axes(variables: Mapping[str, VarSetting], zips: Sequence[Zip],
                   used: Sequence[str]) -> tuple[dict[str, Any], list[Axis]]:
    """The used variables outside zip groups: fixed values, and an axis for each list."""
    zip_vars = _zip_variables(zips)
    fixed: dict[str, Any] = {}
    axes: list[Axis] = []
    for name, (value, _, _) in variables.items():
        if name in zip_vars or name not in used:
            continue
        if isinstance(value, list):
            axes.append(Axis(VAR_PREFIX + name, (VAR_PREFIX + name,), (tuple(value),)))
        else:
            fixed[name] = value
    return fixed, axes


def _param_axes(settings: Mapping[str, Setting],
                zips: Sequence[Zip]) -> tuple[dict[str, Any], list[Axis]]:
    """Fixed fluxParams, then the axes of list-valued params, zip groups and seeds (in the
    order items vary: the seed axis last)."""
    fixed: dict[str, Any] = {}
    axes: list[Axis] = []
    for name in FLUX_PARAM_NAMES:
        setting = settings.get(name)
        if setting is None or name == "seed":
            continue
        if setting.is_axis:
            axes.append(Axis(name, (name,), (setting.value,)))
        else:
            fixed[name] = list(setting.value) if name == "input_images" else setting.value
    for z in zips:
        fields = tuple(f for f, _, _ in z.columns)
        label = fields[0] if len(fields) == 1 else "zip(" + ",".join(
            f.removeprefix(VAR_PREFIX) for f in fields) + ")"
        axes.append(Axis(label, fields, tuple(values for _, values, _ in z.columns)))
    seed = settings.get("seed")
    if seed is not None and not _zips_seed(zips):
        if seed.is_axis:
            axes.append(Axis("seed", ("seed",), (seed.value,)))
        else:
            fixed["seed"] = seed.value
    return fixed, axes


def _zips_seed(zips: Sequence[Zip]) -> bool:
    return any(f == "seed" for z in zips for f, _, _ in z.columns)


def _repeat(settings: Mapping[str, Setting], zips: Sequence[Zip], ctx: Context) -> int:
    """How many times each combination is asked for (``repeat`` x derived ``seeds`` count);
    derived seeds cannot meet fixed ones."""
    repeat_setting = settings.get("repeat")
    repeat: int = repeat_setting.value if repeat_setting else 1
    if "seedcount" in settings:
        repeat *= settings["seedcount"].value
    has_seed = "seed" in settings or _zips_seed(zips)
    if repeat > 1 and has_seed and "seedcount" not in settings:
        where = repeat_setting or settings["seedcount"]
        ctx.error(where.doc, where.path, "repeat needs derived seeds: drop seed/seeds, or list "
                  "more seeds instead")
    elif "seedcount" in settings and has_seed:
        where = settings["seedcount"]
        ctx.error(where.doc, where.path, "seeds without start derive their seeds; "
                  "it cannot be combined with a fixed seed")
    return repeat


def _values(name: str, fixed: Mapping[str, Any], axes: Sequence[Axis], default: Any) -> list[Any]:
    """Every value ``name`` takes across the axes, else its fixed value (or ``default``)."""
    out: list[Any] = []
    for axis in axes:
        for f, column in zip(axis.fields, axis.columns, strict=True):
            if f == name:
                out.extend(column)
    if out:
        return out
    return [fixed.get(name, default)]


def _check_params(raw: RawEntry, settings: Mapping[str, Setting], fixed: Mapping[str, Any],
                  axes: Sequence[Axis], ctx: Context) -> None:
    """``custom`` needs width and height (and they need it); ``match_input_image`` needs an
    input image."""
    ratios = _values("aspect_ratio", fixed, axes, "1:1")
    ratio_where = settings.get("aspect_ratio")
    ratio_doc, ratio_path = ((ratio_where.doc, ratio_where.path) if ratio_where
                             else (raw.doc, raw.path))
    for name in ("width", "height"):
        present = [v for v in _values(name, fixed, axes, None) if v is not None]
        where = settings.get(name)
        if present and "custom" not in ratios and where is not None:
            ctx.error(where.doc, where.path, f"{name} is only used with aspect_ratio custom",
                      key=True)
        if "custom" in ratios and not present:
            ctx.error(ratio_doc, ratio_path,
                      f"aspect_ratio custom needs width and height ({name} missing)")
    if "match_input_image" in ratios:
        images = _values("input_images", fixed, axes, ())
        if any(not row for row in images):
            ctx.error(ratio_doc, ratio_path,
                      "aspect_ratio match_input_image needs at least one input image")


def _check_length(raw: RawEntry, parts: Parts, fixed_vars: Mapping[str, Any],
                  axes: Sequence[Axis], ctx: Context) -> None:
    """The prompt is 1-:data:`MAX_PROMPT_CHARS` characters for every combination of values,
    computed from the shortest and longest value of each variable axis."""
    occurrences: dict[str, int] = {}
    low = 0
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
                       for f, column in zip(axis.fields, axis.columns, strict=True)
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


# --------------------------------------------------------------------------- across entries


def check_ids(raws: Sequence[RawEntry], ctx: Context) -> None:
    """Each prompt id (given or derived) is used once."""
    seen: dict[str, RawEntry] = {}
    for raw in raws:
        prompt_id = raw.prompt_id
        first = seen.get(prompt_id)
        if first is None:
            seen[prompt_id] = raw
            continue
        where = f"{first.doc.file}:{first.doc.line_of(first.path)}"
        doc, path = (raw.doc, raw.id_path) if raw.id else (raw.doc, raw.path)
        ctx.error(doc, path, f"duplicate id {prompt_id!r} (first used at {where})")


def duplicate_entries(entries: Sequence[PromptEntry]) -> Iterator[Diagnostic]:
    """Warnings for entries that ask for exactly the same requests as an earlier one (found
    cheaply, by entry). ``meta`` is not part of a request: entries that differ only in it
    still ask for the same images, which are generated once."""
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
