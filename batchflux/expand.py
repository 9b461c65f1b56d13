"""Expand a validated job into its work items: grid, templates, seeds and stable keys.

Pure functions over values (no I/O): :func:`expand_job` is a lazy iterator, so a
1,000,000-item grid is never held in memory, and :func:`count_items` / :func:`axis_sizes`
answer by arithmetic.

Each prompt entry is the product of its axes (template variables, fluxParams given as lists,
zip groups, seeds) times ``repeat``, in that order, the last axis varying fastest::

    for item in expand_job(load_job("jobs/product-photos.yaml")):
        print(item.index, item.prompt_id, item.seed, item.params["aspect_ratio"], item.key[:12])

Identity: ``key`` is the sha256 of the canonical JSON (sorted keys, no spaces) of
``{"model", "prompt", "params"}``, with local input image paths replaced by
``"sha256:<content hash>"``. A seed the manifest does not fix is derived the same way from
the request without its seed plus the repeat number, so the same manifest line always asks
for the same image, and appending prompts never changes the keys of existing ones. An
entry's ``meta`` is copied onto each of its items but is not part of the request, so it is
in neither the key nor the derived seed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .models import (
    FLUX_DEFAULTS,
    FLUX_PARAM_NAMES,
    JobSpec,
    PromptEntry,
    WorkItem,
    is_remote_ref,
)

__all__ = ["MAX_SEED", "VAR_PREFIX", "AxisSummary", "axis_sizes", "axis_summaries",
           "canonical_json", "count_items", "derive_seed", "expand_entry", "expand_job",
           "finalize_params", "format_value", "render", "request_key"]

MAX_SEED = 2**31 - 1
VAR_PREFIX = "vars."


@dataclass(frozen=True, slots=True)
class AxisSummary:
    """An axis as seen across the whole job (for ``plan``)."""

    name: str
    size: int
    varies: bool = field(default=False)  # True when prompts disagree on its size


def render(parts: Sequence[tuple[str, str | None]], variables: Mapping[str, Any]) -> str:
    """Substitute ``variables`` into a parsed template."""
    return "".join(
        literal + (format_value(variables[name]) if name is not None else "")
        for literal, name in parts
    )


def format_value(value: Any) -> str:
    """How a variable value reads inside a prompt (``true``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the form every hash in batchflux is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _hashed_params(params: Mapping[str, Any], image_hashes: Mapping[str, str]) -> dict[str, Any]:
    images = params.get("input_images")
    if not images:
        return dict(params)
    out = dict(params)
    out["input_images"] = [ref if is_remote_ref(ref) else image_hashes.get(ref, ref)
                           for ref in images]
    return out


def request_key(
    model: str, prompt: str, params: Mapping[str, Any], image_hashes: Mapping[str, str]
) -> str:
    """The hex sha256 identity of one request (see the module docstring)."""
    canonical = canonical_json(
        {"model": model, "prompt": prompt, "params": _hashed_params(params, image_hashes)}
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def derive_seed(
    model: str,
    prompt: str,
    params: Mapping[str, Any],
    repeat: int,
    image_hashes: Mapping[str, str],
) -> int:
    """A seed in 0..2**31-1 from the request without its seed, and the repeat number."""
    unseeded = {k: v for k, v in _hashed_params(params, image_hashes).items() if k != "seed"}
    canonical = canonical_json(
        {"model": model, "prompt": prompt, "params": unseeded, "repeat": repeat}
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)


def finalize_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Fill ``FLUX_DEFAULTS``, drop width/height unless custom, order canonically."""
    merged = {**FLUX_DEFAULTS, **params}
    if merged.get("aspect_ratio") != "custom":
        merged.pop("width", None)
        merged.pop("height", None)
    if not merged.get("input_images"):
        merged.pop("input_images", None)
    else:
        merged["input_images"] = list(merged["input_images"])
    return {name: merged[name] for name in FLUX_PARAM_NAMES if name in merged}


def expand_entry(
    entry: PromptEntry,
    *,
    model: str,
    image_hashes: Mapping[str, str],
    start_index: int = 0,
) -> Iterator[WorkItem]:
    """The items of one entry, lazily, indexed from ``start_index``."""
    index = start_index
    for combo in itertools.product(*(range(len(axis)) for axis in entry.axes)):
        variables = dict(entry.vars)
        params = dict(entry.params)
        for axis, row in zip(entry.axes, combo, strict=True):
            for name, column in zip(axis.fields, axis.columns, strict=True):
                value = column[row]
                if name.startswith(VAR_PREFIX):
                    variables[name[len(VAR_PREFIX):]] = value
                else:
                    params[name] = value
        prompt = render(entry.parts, variables) if entry.is_template else entry.text
        params = finalize_params(params)
        for repeat in range(entry.repeat):
            final = params
            if "seed" not in params:
                final = dict(params)
                final["seed"] = derive_seed(model, prompt, params, repeat, image_hashes)
                final = {name: final[name] for name in FLUX_PARAM_NAMES if name in final}
            yield WorkItem(
                index=index,
                key=request_key(model, prompt, final, image_hashes),
                prompt_id=entry.prompt_id,
                prompt=prompt,
                params=final,
                model=model,
                template=entry.text if entry.is_template else None,
                vars=variables if entry.is_template else {},
                source=entry.source,
                meta=entry.meta,
            )
            index += 1


def expand_job(spec: JobSpec) -> Iterator[WorkItem]:
    """Every work item of ``spec``, lazily, in expansion order (``index`` 0, 1, 2, ...).

    >>> from batchflux import expand_job, load_job
    >>> items = expand_job(load_job("jobs/nightly.yaml"))
    >>> [(item.prompt_id, item.params["seed"]) for item in items][:3]
    [('lighthouse', 11), ('lighthouse', 22), ('market', 11)]
    """
    index = 0
    for entry in spec.entries:
        yield from expand_entry(entry, model=spec.model, image_hashes=spec.image_hashes,
                                start_index=index)
        index += entry.size


def count_items(spec: JobSpec) -> int:
    """How many items ``spec`` expands to, by arithmetic (nothing is expanded).

    >>> from batchflux import count_items, load_job
    >>> count_items(load_job("jobs/nightly.yaml"))    # 5 prompts x 2 seeds, one in 2 aspects
    12
    """
    return sum(entry.size for entry in spec.entries)


def axis_summaries(spec: JobSpec) -> list[AxisSummary]:
    """Each axis with its largest size across prompts, and whether prompts disagree."""
    sizes: dict[str, set[int]] = {}
    present: dict[str, int] = {}
    for entry in spec.entries:
        for axis in entry.axes:
            sizes.setdefault(axis.name, set()).add(len(axis))
            present[axis.name] = present.get(axis.name, 0) + 1
        if entry.repeat > 1:
            sizes.setdefault("repeat", set()).add(entry.repeat)
            present["repeat"] = present.get("repeat", 0) + 1
    for name, count in present.items():
        if count < len(spec.entries):
            sizes[name].add(1)
    out = [AxisSummary("prompts", len(spec.entries))]
    for name, values in sorted(sizes.items(), key=lambda pair: _axis_rank(pair[0])):
        out.append(AxisSummary(name, max(values), varies=len(values) > 1))
    return out


def _axis_rank(name: str) -> tuple[int, int]:
    if name.startswith(VAR_PREFIX):
        return (0, 0)
    if name == "seed":
        return (3, 0)
    if name == "repeat":
        return (4, 0)
    if name in FLUX_PARAM_NAMES:
        return (1, FLUX_PARAM_NAMES.index(name))
    return (2, 0)


def axis_sizes(spec: JobSpec) -> dict[str, int]:
    """``{"prompts": N, "<axis>": size, ...}``; where prompts differ, the largest size.

    Axis names: ``vars.<name>`` for template variables, fluxParam names (``aspect_ratio``,
    ``seed``, ...), ``zip(a,b)`` for zip groups and ``repeat``.
    """
    return {summary.name: summary.size for summary in axis_summaries(spec)}
