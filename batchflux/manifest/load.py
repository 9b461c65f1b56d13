""":func:`load_job`: a manifest file -> a validated :class:`~batchflux.models.JobSpec`.

The orchestration of the readers: read the text (:mod:`.text`), parse it with positions
(:mod:`.yaml_positions`, or JSONL lines), validate it against the schema
(:mod:`batchflux.schema`), read the prompt entries from their source (:mod:`.sources`),
resolve each one (:mod:`.resolve`), check the reference images (:mod:`.images`) and the
``run:`` options, and apply the ``max_items`` guard. Every problem found on the way is
collected; they are raised together, sorted, as one
:class:`~batchflux.errors.ManifestError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import ManifestError
from ..filenames import check_filename_template
from ..models import (
    DEFAULT_MODEL,
    DEFAULT_RUN_OPTIONS,
    Diagnostic,
    JobSpec,
    PromptEntry,
    RunOptions,
)
from ..schema import validate_document
from .images import check_images
from .positions import Doc, FieldPath
from .raw import Context, RawEntry
from .resolve import build_entry, check_ids, duplicate_entries, used_variables
from .settings import read_settings, read_vars, read_zips
from .sources import file_entries, jsonl_entries, yaml_entries
from .text import read_text
from .yaml_positions import parse_yaml

__all__ = ["load_job"]

_RUN_FLOATS = ("rpm", "budget", "job_timeout", "cost_per_image")
_ENTRY_FIELD = re.compile(r"^prompts\[(\d+)\]")


def load_job(path: str | os.PathLike[str], *, max_items: int | None = None) -> JobSpec:
    """Read, validate and resolve a manifest (YAML, or JSONL by its ``.jsonl`` suffix).

    ``max_items`` overrides the manifest's ``run.max_items`` guard (default
    ``DEFAULT_RUN_OPTIONS.max_items``). Raises :class:`~batchflux.errors.ManifestError`
    carrying every diagnostic found, sorted; never a traceback for bad input.

        >>> spec = load_job("jobs/product-photos.yaml")
        >>> spec.entries[0].prompt_id, sum(entry.size for entry in spec.entries)
        ('mug', 48)
    """
    manifest = Path(path)
    display = os.fspath(path)
    text = read_text(manifest, display)
    ctx = Context(diagnostics=[])
    size_at: tuple[Doc, FieldPath] | None = None
    if manifest.suffix.lower() == ".jsonl":
        raws = list(jsonl_entries(text, display, manifest.parent, ctx))
        spec_format, options = "jsonl", RunOptions()
    else:
        raws, options, size_at = _read_yaml(text, display, manifest.parent, ctx)
        spec_format = "yaml"
    entries = [entry for entry in (build_entry(raw, ctx) for raw in raws) if entry is not None]
    check_ids(raws, ctx)
    image_hashes = check_images(ctx)
    _check_size(entries, options, max_items, display, size_at, ctx)
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
        warnings=tuple(sorted(duplicate_entries(entries))),
        format=spec_format,
    )


def _read_yaml(text: str, display: str, directory: Path, ctx: Context
               ) -> tuple[list[RawEntry], RunOptions, tuple[Doc, FieldPath]]:
    """The raw entries and run options of a YAML manifest, and where its size is reported.

    Raises ManifestError at once when the document cannot be read past its top level (YAML
    problems, or a schema problem outside the prompt entries); a schema problem inside an
    entry only leaves that entry out, so that every other entry is still checked.
    """
    document, locate, yaml_diags = parse_yaml(text, display)
    ctx.diagnostics.extend(yaml_diags)
    doc = Doc(display, locate, directory)
    reported = {(d.line, d.col) for d in yaml_diags}
    schema_diags = [d for d in validate_document(document, "job", file=display, locate=locate)
                    if (d.line, d.col) not in reported]
    ctx.diagnostics.extend(schema_diags)
    if yaml_diags or any(_ENTRY_FIELD.match(d.field) is None for d in schema_diags):
        raise ManifestError(ctx.diagnostics)
    bad_entries = {int(match.group(1)) for d in schema_diags
                   if (match := _ENTRY_FIELD.match(d.field)) is not None}
    raws = list(_yaml_entries(document, doc, ctx, bad_entries))
    # Which template variables the prompts use, for {vars.NAME} in file names; unknown
    # while other entries are in error (a prompt that failed may be the one using it).
    used = None if ctx.diagnostics else used_variables(raws)
    options = _run_options(document.get("run", {}), doc, ctx, variables=used)
    size_path: FieldPath = (("grid",) if "grid" in document else
                            ("prompts",) if "prompts" in document else ("prompts_file",))
    return raws, options, (doc, size_path)


def _yaml_entries(document: Mapping[str, Any], doc: Doc, ctx: Context,
                  bad_entries: set[int]) -> Iterator[RawEntry]:
    """Read the manifest-wide settings into ``ctx``, then yield the prompt entries."""
    ctx.model = document.get("model", DEFAULT_MODEL)
    defaults = document.get("defaults", {})
    grid = document.get("grid", {})
    grid_settings = read_settings(grid, doc, ("grid",), ("grid",), grid, ctx)
    ctx.base = {**read_settings({}, doc, ("defaults",), ("defaults",), defaults, ctx),
                **grid_settings}
    if "zip" in grid:
        ctx.base_zip = read_zips(grid["zip"], doc, ("grid", "zip"), grid_settings, ctx)
    ctx.vars = read_vars(document.get("vars", {}), doc, ("vars",), ctx)
    has_prompts, has_file = "prompts" in document, "prompts_file" in document
    if has_prompts and has_file:
        ctx.error(doc, ("prompts_file",), "give prompts or prompts_file, not both", key=True)
        return
    if not has_prompts and not has_file:
        ctx.error(doc, (), "missing prompts (or prompts_file)")
        return
    if has_prompts:
        yield from yaml_entries(document["prompts"], doc, ctx, bad_entries)
    else:
        yield from file_entries(document["prompts_file"], doc, ctx)


def _run_options(run: Mapping[str, Any], doc: Doc, ctx: Context, *,
                 variables: set[str] | None = None) -> RunOptions:
    """The ``run:`` block as RunOptions; the file-name template is checked by the module
    that renders it (against the template variables the prompts use)."""
    values: dict[str, Any] = {k: (float(v) if k in _RUN_FLOATS else v) for k, v in run.items()}
    template = values.get("filename_template")
    if template is not None:
        problem = check_filename_template(str(template), variables=variables)
        if problem:
            ctx.error(doc, ("run", "filename_template"), problem)
    return RunOptions(**values)


def _check_size(entries: list[PromptEntry], options: RunOptions, max_items: int | None,
                display: str, size_at: tuple[Doc, FieldPath] | None, ctx: Context) -> None:
    """Refuse a grid larger than the ``max_items`` guard (argument > ``run.max_items`` >
    the default)."""
    total = sum(entry.size for entry in entries)
    guard = max_items if max_items is not None else (options.max_items or
                                                     DEFAULT_RUN_OPTIONS.max_items or 0)
    if not guard or total <= guard:
        return
    message = (f"the grid expands to {total:,} items, over max_items {guard:,} "
               "(set run.max_items or pass --max-items to allow it)")
    if size_at is None:
        ctx.diagnostics.append(Diagnostic(display, 1, 1, "", message))
    else:
        ctx.error(size_at[0], size_at[1], message, key=True)
