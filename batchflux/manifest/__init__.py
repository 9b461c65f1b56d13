"""Manifest files -> :class:`~batchflux.models.JobSpec`: read, parse with source positions,
validate, resolve.

A manifest is YAML (``*.yaml``/``*.yml``, for people; see ``docs/manifest.md``) or JSONL
(``*.jsonl``, one item per line, for machines). :func:`load_job` reports *every* problem at
once as a :class:`~batchflux.errors.ManifestError` whose diagnostics read
``FILE:LINE:COL: field.path: message`` and point at the exact key or value.

    >>> spec = load_job("jobs/product-photos.yaml")
    >>> from batchflux.expand import count_items
    >>> count_items(spec)
    48

The package is split by job, each module using only the ones above it:

=====================  ====================================================================
``text``               bytes -> text: missing, empty, binary and non-UTF-8 files refused
``positions``          field paths, locators, the ``Doc`` a diagnostic is placed in
``yaml_positions``     YAML -> plain values with the position of every key and value
                       (duplicate keys, tags, alias bombs); yaml lives here only
``raw``                the intermediate values: settings, zip groups and raw entries with
                       their positions, and the context that collects diagnostics
``images``             local reference images: resolved, then identified and hashed once
                       (Pillow lives here only)
``settings``           one level (defaults, grid, entry, JSONL line) -> settings and axes
``sources``            the prompts: a YAML list, JSONL lines, CSV/TSV rows (with ``meta``)
``resolve``            raw entries -> ``PromptEntry``: precedence, variables, axes, checks
``load``               ``load_job``: the orchestration, the ``run:`` block, the size guard
=====================  ====================================================================

The values it produces (``JobSpec``, ``PromptEntry``, ``Axis``, ``Diagnostic``) live in
:mod:`batchflux.models`, so that :mod:`batchflux.expand` and ``plan`` depend on values and
never on these readers. File-name templates are checked by :mod:`batchflux.filenames`, beside
the code that renders them.
"""

from __future__ import annotations

from ..filenames import FILENAME_PLACEHOLDERS, check_filename_template
from ..models import Axis, JobSpec, PromptEntry
from .load import load_job
from .resolve import MAX_PROMPT_CHARS
from .settings import MAX_INPUT_IMAGES
from .yaml_positions import MAX_YAML_NODES

__all__ = [
    "FILENAME_PLACEHOLDERS",
    "MAX_INPUT_IMAGES",
    "MAX_PROMPT_CHARS",
    "MAX_YAML_NODES",
    "Axis",
    "JobSpec",
    "PromptEntry",
    "check_filename_template",
    "load_job",
]
