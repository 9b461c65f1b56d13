"""Image file names from the file-name template: pure functions over a work item.

A template is a ``str.format`` pattern over these placeholders (format specs welcome):

=============  ====  ==================================================================
placeholder    type  value
=============  ====  ==================================================================
``{key}``      str   the item key (64 hex digits): unique per request, stable forever
``{key12}``    str   its first 12 hex digits
``{prompt_id}`` str  the prompt's id (``p0001``... when the manifest gives none)
``{index}``    int   the item's position in the expanded manifest (changes on edits)
``{seed}``     int   the concrete seed
``{aspect}``   str   the aspect ratio with ``x`` for ``:`` (``16x9``, ``custom``)
``{w}``        int   the image width in pixels
``{h}``        int   the image height in pixels
``{ext}``      str   the file extension (``webp``, ``png``, ``jpg``)
``{format}``   str   the same as ``{ext}``
``{model}``    str   the model (``flux-2-dev``)
``{vars.NAME}`` str  the value of the prompt template variable ``NAME`` (``{vars.background}``);
                     empty for an item whose prompt has no such variable
=============  ====  ==================================================================

``{index:04d}`` and ``{seed:08d}`` zero-pad; strings take string specs (``{prompt_id:.20}``).
Every string value is made a safe path component before formatting and every rendered
component again after it, so no value or template can reach outside ``images/``. A component
that renders empty (a ``{vars.NAME}`` the item's prompt does not have) is left out.

A template must contain ``{key}`` or ``{key12}``: file names must stay unique when the
manifest changes, and ``{index}`` alone does not (insert a prompt and every later index
moves, so a new item would be written over another item's image).
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from .errors import FilenameTemplateError
from .expand import format_value
from .models import WorkItem

__all__ = ["FILENAME_PLACEHOLDERS", "VARS_PLACEHOLDER", "FilenameTemplateError",
           "check_filename_template", "render_filename", "safe_component",
           "template_variables"]

#: Every placeholder a file-name template may use.
FILENAME_PLACEHOLDERS = frozenset(
    {"prompt_id", "index", "key", "key12", "seed", "aspect", "ext", "model", "format", "w", "h"}
)
#: The placeholders that make a name unique to its item and stable under manifest edits.
IDENTITY_PLACEHOLDERS = frozenset({"key", "key12"})
#: The placeholders that are integers (format specs such as ``04d`` apply); the rest are text.
NUMBER_PLACEHOLDERS = ("index", "seed", "w", "h")
#: The prefix of a template-variable placeholder: ``{vars.background}`` is the item's value of
#: the prompt template variable ``background`` (text, sanitised like every other value).
VARS_PLACEHOLDER = "vars."
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_MAX_COMPONENT = 120  # bytes per path component, well under every filesystem's 255
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_FORMAT_ERRORS = (KeyError, ValueError, IndexError, AttributeError, TypeError, OverflowError)

#: The item a template is tried on by :func:`check_filename_template` (a large seed, so that
#: a spec that only fits small numbers, such as ``{seed:c}``, fails here and not after paying).
_SAMPLE = WorkItem(index=0, key="0123456789abcdef" * 4, prompt_id="p0001", prompt="sample",
                   params={"seed": 4_294_967_295, "aspect_ratio": "16:9"})


class _Formatter(string.Formatter):
    """``str.format`` where a field ``vars.NAME`` is looked up as one name (never as an
    attribute of an object): a variable the item lacks is empty."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        if field_name.startswith(VARS_PLACEHOLDER):
            return kwargs.get(field_name, ""), field_name
        return super().get_field(field_name, args, kwargs)


_FORMATTER = _Formatter()


def safe_component(text: str) -> str:
    """One path component from arbitrary text: ASCII letters, digits, ``._-``; never empty,
    never ``.`` or ``..``, at most 120 bytes."""
    text = _sanitise(text)
    text = text[:_MAX_COMPONENT].rstrip("._")
    return text or "_"


def _values(item: WorkItem, ext: str, width: int | None, height: int | None
            ) -> Mapping[str, Any]:
    aspect = str(item.params.get("aspect_ratio", "1:1")).replace(":", "x")
    strings = {
        "prompt_id": item.prompt_id,
        "key": item.key,
        "key12": item.key[:12],
        "aspect": aspect,
        "ext": ext,
        "format": ext,
        "model": item.model,
    }
    values: dict[str, Any] = {name: safe_component(value) for name, value in strings.items()}
    values.update(index=int(item.index), seed=int(item.seed),
                  w=int(width or 0), h=int(height or 0))
    for name, value in item.vars.items():
        values[VARS_PLACEHOLDER + name] = safe_component(format_value(value))
    return values


def template_variables(template: str) -> tuple[str, ...]:
    """The template variables a file-name template names (``{vars.NAME}``), in order, once
    each; empty when the template does not parse."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:
        return ()
    return tuple(dict.fromkeys(name[len(VARS_PLACEHOLDER):] for name in fields
                               if name.startswith(VARS_PLACEHOLDER)))


def render_filename(template: str, item: WorkItem, *, ext: str, image_number: int = 1,
                    width: int | None = None, height: int | None = None) -> str:
    """The relative path (with ``/``) of an item's image from the file-name template.

    ``index``, ``seed``, ``w`` and ``h`` are integers (so ``{index:04d}`` works), the rest
    strings; each rendered component is sanitised after formatting and the template's own
    ``/`` are the only directory separators. Raises :class:`FilenameTemplateError`.

    >>> item = WorkItem(index=7, key="ab" * 32, prompt_id="mug", prompt="a mug",
    ...                 params={"seed": 42, "aspect_ratio": "16:9"})
    >>> render_filename("{prompt_id}/{index:04d}_{key12}_{seed:08d}.{ext}", item, ext="png")
    'mug/0007_abababababab_00000042.png'
    """
    try:
        rendered = _FORMATTER.vformat(template, (), _values(item, ext, width, height))
    except _FORMAT_ERRORS as exc:
        raise FilenameTemplateError(f"bad file-name template {template!r}: {exc}") from exc
    parts = [_sanitise(part) for part in rendered.replace("\\", "/").split("/") if part]
    parts = [part for part in parts if part]
    if not parts:
        raise FilenameTemplateError(f"file-name template {template!r} renders to nothing")
    if image_number > 1:
        stem, dot, suffix = parts[-1].rpartition(".")
        parts[-1] = f"{stem}-{image_number}.{suffix}" if dot else f"{parts[-1]}-{image_number}"
    return "/".join(_fit(part) for part in parts)


def check_filename_template(template: str, *, relative_only: bool = True,
                            variables: Collection[str] | None = None) -> str | None:
    """Why ``template`` is not a usable file-name template, or None when it is.

    It must parse, use only :data:`FILENAME_PLACEHOLDERS` and ``{vars.NAME}``, contain
    ``{key}`` or ``{key12}``, and render a sample item (so a format spec that cannot format,
    such as ``{prompt_id:04d}``, is refused here, before anything is paid). ``relative_only``
    also refuses absolute paths and ``..`` (a manifest; a library caller's template is only
    sanitised). ``variables``, when given, are the template variables the manifest's prompts
    use: a ``{vars.NAME}`` naming another is refused.
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return f"invalid template: {exc}"
    unknown = [name for name in fields if name not in FILENAME_PLACEHOLDERS
               and not name.startswith(VARS_PLACEHOLDER)]
    if unknown:
        known = " ".join(["{" + n + "}" for n in sorted(FILENAME_PLACEHOLDERS)]
                         + ["{" + VARS_PLACEHOLDER + "NAME}"])
        return f"unknown placeholder {{{unknown[0]}}} (known: {known})"
    for field_name in fields:
        if field_name.startswith(VARS_PLACEHOLDER) and not _VAR_NAME.fullmatch(
                field_name[len(VARS_PLACEHOLDER):]):
            return (f"invalid placeholder {{{field_name}}}: write {{{VARS_PLACEHOLDER}NAME}} "
                    "with the name of a template variable")
    if variables is not None:
        for var in template_variables(template):
            if var not in variables:
                listing = (f"variables: {', '.join(sorted(variables))}" if variables
                           else "the prompts use no template variables")
                return (f"unknown placeholder {{{VARS_PLACEHOLDER}{var}}}: no prompt uses a "
                        f"template variable {var!r} ({listing})")
    if relative_only and (template.startswith(("/", "\\"))
                          or ".." in re.split(r"[\\/]", template)):
        return "must be a relative path without '..'"
    if not IDENTITY_PLACEHOLDERS & set(fields):
        if "index" in fields:
            return ("must contain {key} or {key12}: {index} alone changes when prompts are "
                    "inserted or removed, and a new item would then overwrite another item's "
                    "image")
        return "must contain {key} or {key12} so that every item has its own file name"
    sample = replace(_SAMPLE, vars={name: "sample" for name in template_variables(template)})
    values = _values(sample, "png", 1024, 576)
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        field = "{" + name + (f"!{conversion}" if conversion else "") + \
            (f":{spec}" if spec else "") + "}"
        try:
            _FORMATTER.vformat(field, (), values)
        except _FORMAT_ERRORS as exc:
            numbers = " ".join("{" + n + "}" for n in NUMBER_PLACEHOLDERS)
            kind = ("a number" if name in NUMBER_PLACEHOLDERS
                    else f"text; only {numbers} are numbers")
            return f"cannot format {field}: {exc} ({{{name}}} is {kind})"
    try:
        render_filename(template, sample, ext="png", width=1024, height=576)
    except FilenameTemplateError as exc:
        return str(exc)
    return None


def _sanitise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return _UNSAFE.sub("_", text).strip("._")


def _fit(part: str) -> str:
    """A component cut to the length cap. Cutting must not make two names equal (the unique
    placeholder may sit at the end) nor drop the extension, so a cut name keeps its extension
    and gains a digest of the whole text."""
    if len(part) <= _MAX_COMPONENT:
        return part
    stem, dot, ext = part.rpartition(".")
    if not dot or len(ext) > 8:
        stem, ext = part, ""
    digest = hashlib.sha256(part.encode()).hexdigest()[:12]
    tail = f"-{digest}" + (f".{ext}" if ext else "")
    return stem[:_MAX_COMPONENT - len(tail)].rstrip("._") + tail
