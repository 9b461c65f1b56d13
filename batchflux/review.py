"""What the two ways of reviewing a run share: its items grouped by prompt, how each image is
labelled, the grid views' columns, and the thumbnails.

The static page (``batchflux report --html``, :func:`batchflux.report.write_review`) and the
review app (``batchflux review``, :mod:`batchflux.reviewapp`) both show a run the same way:

- :func:`prompt_groups` puts the items of one prompt together; what all of them send alike is
  shown once in the group's header (:attr:`PromptGroup.common`), and each image shows only
  :func:`image_label` (seed, aspect ratio, size) and :func:`varying_params`.
- :func:`axis_value` and :func:`axis_values` give the columns of the grid views (prompt rows x
  seed columns, prompt rows x aspect columns: the X/Y plot of image tools).
- A reroll (``batchflux run M --reroll rejected``, :mod:`batchflux.reroll`) sits right after its
  original: :func:`chain_order` puts each original's rerolls after it, by attempt; given the
  run's records, the grid functions put a reroll in its original's column, and
  :func:`reroll_label` says what it rerolls (``reroll 1 of seed 1002 · 1:1``).
- :func:`make_thumbnail` makes a JPEG of an image, cached in ``OUT/review/thumbs/``
  (:func:`thumb_path`), for both.
- :func:`manifest_note` says how many results are not in the manifest and whether they are
  shown (``--all``) or hidden, in the same words in the table, the page and the app.

Everything here works on :class:`~batchflux.models.Result` records.

>>> from batchflux import read_results
>>> groups = prompt_groups(read_results("out/nightly").ordered())
>>> [(g.prompt_id, len(g.records), dict(g.common)) for g in groups][0]
('lighthouse', 2, {...})
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .display import plural
from .fileutil import write_atomic
from .models import FileRecord, Result

__all__ = [
    "AXES",
    "DEFAULT_THUMB_SIZE",
    "NOT_IN_MANIFEST",
    "PER_IMAGE_PARAMS",
    "REVIEW_DIR",
    "PromptGroup",
    "axis_value",
    "axis_values",
    "chain_order",
    "format_value",
    "image_label",
    "make_thumbnail",
    "manifest_note",
    "prompt_groups",
    "reroll_label",
    "thumb_name",
    "thumb_path",
    "varying_params",
]

REVIEW_DIR = "review"
THUMB_DIR = "thumbs"
DEFAULT_THUMB_SIZE = 256

#: Shown on each image: what tells the images of one prompt apart.
PER_IMAGE_PARAMS = ("seed", "aspect_ratio", "width", "height")
#: The grid views: prompt rows x columns of one of these.
AXES = ("seed", "aspect")
#: How a result of an item the current manifest no longer has is marked.
NOT_IN_MANIFEST = "not in the manifest"


def manifest_note(count: int, *, include_all: bool) -> str:
    """The line that counts the results not in the manifest, and says where they went.

    >>> manifest_note(18, include_all=False)
    '18 results not in the manifest (hidden; --all shows them)'
    >>> manifest_note(1, include_all=True)
    '1 result not in the manifest (shown with --all, marked as such)'
    """
    where = ("shown with --all, marked as such" if include_all
             else "hidden; --all shows them")
    return f"{plural(count, 'result')} {NOT_IN_MANIFEST} ({where})"


# --------------------------------------------------------------------------------------------
# Groups: what the items of one prompt share is shown once


@dataclass(frozen=True, slots=True)
class PromptGroup:
    """The items of one prompt (same prompt id and resolved text), in run order with each
    original's rerolls right after it (:func:`chain_order`).

    ``common`` holds the params sent with the same value to every item of the group (seed,
    aspect ratio and size aside: those are shown on each image). A page shows them once, in the
    group's header; each image shows only :func:`image_label` and :func:`varying_params`.
    """

    number: int
    prompt_id: str
    prompt: str
    common: tuple[tuple[str, Any], ...]
    records: tuple[Result, ...]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def chain_order(records: Iterable[Result]) -> list[Result]:
    """``records`` in their order, except that each reroll comes right after its original,
    the rerolls of one original by attempt (1, 2, ...). A reroll whose original is not among
    ``records`` keeps its place."""
    listed = list(records)
    position = {record.key: n for n, record in enumerate(listed)}

    def place(n: int) -> tuple[int, int, int]:
        record = listed[n]
        root = position.get(record.reroll_of) if record.reroll_of is not None else None
        return (n, 0, n) if root is None else (root, record.attempt, n)

    return [listed[n] for n in sorted(range(len(listed)), key=place)]


def prompt_groups(records: Iterable[Result]) -> list[PromptGroup]:
    """``records`` grouped by prompt, groups in order of first appearance; in a group, each
    original's rerolls come right after it (:func:`chain_order`)."""
    grouped: dict[tuple[str, str], list[Result]] = {}
    for record in chain_order(records):
        grouped.setdefault((record.prompt_id, record.prompt), []).append(record)
    groups = []
    for number, ((prompt_id, prompt), members) in enumerate(grouped.items()):
        params = [record.params for record in members]
        names = sorted({name for p in params for name in p} - set(PER_IMAGE_PARAMS))
        common = tuple(
            (name, params[0][name]) for name in names
            if all(name in p for p in params)
            and len({_canonical(p[name]) for p in params}) == 1
        )
        groups.append(PromptGroup(number, prompt_id, prompt, common, tuple(members)))
    return groups


def varying_params(record: Result, group: PromptGroup) -> list[tuple[str, Any]]:
    """The params of ``record`` that are not common to its group (nor shown in its label)."""
    shared = {name for name, _ in group.common}
    return [(name, record.params[name]) for name in sorted(record.params)
            if name not in shared and name not in PER_IMAGE_PARAMS]


def format_value(value: Any) -> str:
    """A param value as a person reads it: ``true``, ``a.png, b.png``, ``16:9``.

    >>> format_value(True), format_value(["a.png", "b.png"]), format_value("16:9")
    ('true', 'a.png, b.png', '16:9')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return _canonical(value)
    return str(value)


def image_label(record: Result, file: FileRecord | None = None) -> str:
    """``seed 1003 · 1:1 · 1024x1024``: seed, aspect ratio and size of one image (the size
    of ``file`` when given, else the custom size asked for, if any)."""
    params = record.params
    bits = [f"seed {record.seed}"]
    if params.get("aspect_ratio"):
        bits.append(str(params["aspect_ratio"]))
    width = file.width if file is not None else params.get("width")
    height = file.height if file is not None else params.get("height")
    if width and height:
        bits.append(f"{width}x{height}")
    return " · ".join(bits)


def reroll_label(record: Result, originals: Mapping[str, Result]) -> str | None:
    """``reroll 2 of seed 1002 · 1:1``: what a reroll rerolls, by the short label of its
    original (found in ``originals``, the run's records by key; else by its key's first 12
    characters). None for an item that is not a reroll."""
    if record.reroll_of is None:
        return None
    original = originals.get(record.reroll_of)
    name = image_label(original) if original is not None else record.reroll_of[:12]
    return f"reroll {record.attempt} of {name}"


def axis_value(record: Result, axis: str,
               originals: Mapping[str, Result] | None = None) -> str:
    """The column of ``record`` in the prompt x ``axis`` grid (``axis`` in :data:`AXES`).

    Given ``originals`` (the run's records by key), a reroll takes its original's column, so
    that it sits next to it rather than in a column of its own derived seed.
    """
    if originals is not None and record.reroll_of is not None:
        record = originals.get(record.reroll_of, record)
    if axis == "seed":
        return str(record.seed)
    return str(record.params.get("aspect_ratio", ""))


def axis_values(records: Iterable[Result], axis: str,
                originals: Mapping[str, Result] | None = None) -> list[str]:
    """The columns of the prompt x ``axis`` grid: seeds in numeric order, aspect ratios in
    order of first appearance (with ``originals``, rerolls in their originals' columns, as
    :func:`axis_value`)."""
    values = list(dict.fromkeys(axis_value(record, axis, originals) for record in records))
    if axis == "seed":
        values.sort(key=lambda v: (len(v), v))
    return values


# --------------------------------------------------------------------------------------------
# Thumbnails (one implementation: the static page and `batchflux review` share
# OUT/review/thumbs/)


def thumb_name(key: str, number: int) -> str:
    """The file name of the thumbnail of image ``number`` (1-based) of item ``key``."""
    return f"{key[:32]}.jpg" if number == 1 else f"{key[:32]}_{number}.jpg"


def thumb_path(out: Path, key: str, number: int) -> Path:
    """Where the thumbnail of image ``number`` of item ``key`` is cached in run ``out``."""
    return out / REVIEW_DIR / THUMB_DIR / thumb_name(key, number)


def make_thumbnail(source: Path, target: Path, *, size: int = DEFAULT_THUMB_SIZE) -> None:
    """A JPEG of at most ``size`` px on its longer side; skipped when already up to date.

    Written with :func:`~batchflux.fileutil.write_atomic` without ``fsync`` (a cache, made
    again when lost). Safe to call from several threads or processes at once: each writes its
    own temporary file and the last rename wins (both wrote the same picture).
    """
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return
    buffer = io.BytesIO()
    with Image.open(source) as im:
        im.draft("RGB", (size, size))
        im.thumbnail((size, size))
        im.convert("RGB").save(buffer, "JPEG", quality=82, optimize=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, buffer.getvalue(), durable=False)
