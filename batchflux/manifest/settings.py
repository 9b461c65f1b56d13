"""One level of a manifest (defaults, grid, an entry, a JSONL line) -> settings with positions.

A level may set any fluxParam (a list makes it an axis), ``seeds`` in each of its forms,
``repeat``, ``zip`` groups and template ``vars``. These functions read what the schema has
already accepted into :class:`~batchflux.manifest.raw.Setting` and
:class:`~batchflux.manifest.raw.Zip` values, checking what a schema cannot say (a seed range
that runs backwards, a zip group whose lists differ in length, a variable named like a
fluxParam) and resolving local reference images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..expand import MAX_SEED, VAR_PREFIX
from ..models import FLUX_PARAM_NAMES
from ..schema import validate_axis_values
from .images import resolve_ref
from .positions import Doc, FieldPath
from .raw import Context, Setting, VarSetting, Zip, ZipColumn

__all__ = ["MAX_INPUT_IMAGES", "read_settings", "read_vars", "read_zips"]

MAX_INPUT_IMAGES = 5


def _image_setting(value: list[Any], doc: Doc, path: FieldPath, ctx: Context) -> Setting | None:
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
            rows.append(tuple(resolve_ref(r, doc, path + (i, j), ctx) for j, r in enumerate(row)))
        return Setting(tuple(rows), doc, path, is_axis=True)
    if len(value) > MAX_INPUT_IMAGES:
        ctx.error(doc, path, f"at most {MAX_INPUT_IMAGES} input images; got {len(value)}")
    return Setting(tuple(resolve_ref(r, doc, path + (i,), ctx) for i, r in enumerate(value)),
                   doc, path)


def _seed_setting(value: Any, doc: Doc, path: FieldPath, ctx: Context) -> Setting | None:
    """``seeds`` in any of its forms; ``{count}`` without start becomes ``seedcount``."""
    if isinstance(value, list):
        return Setting(tuple(value), doc, path, is_axis=True)
    if isinstance(value, str):
        low, high = (int(x) for x in value.split("-"))
        if low > high:
            ctx.error(doc, path, f"empty seed range {value!r}: the start is above the end")
            return None
        if high > MAX_SEED:
            ctx.error(doc, path, f"seed range {value!r} goes above {MAX_SEED}")
            return None
        return Setting(range(low, high + 1), doc, path, is_axis=True)
    count, start = value["count"], value.get("start")
    if start is None:
        return Setting(count, doc, path)
    if start + count - 1 > MAX_SEED:
        ctx.error(doc, path, f"seeds {start}..{start + count - 1} go above {MAX_SEED}")
        return None
    return Setting(range(start, start + count), doc, path, is_axis=True)


def read_settings(raw: Mapping[str, Any], doc: Doc, base: FieldPath, params_base: FieldPath,
                  params: Mapping[str, Any], ctx: Context) -> dict[str, Setting]:
    """The fluxParams in ``params`` (at ``params_base``) and the ``seeds``/``repeat`` of
    ``raw`` (at ``base``) of one level; a list-valued fluxParam becomes an axis.

    ``seeds: {count: N}`` without a start is returned as ``seedcount`` (N derived seeds);
    every other form of ``seeds`` as the ``seed`` axis.
    """
    out: dict[str, Setting] = {}
    for name in FLUX_PARAM_NAMES:
        if name not in params:
            continue
        value, path = params[name], params_base + (name,)
        if name == "input_images":
            setting = _image_setting(value, doc, path, ctx)
        elif isinstance(value, list):
            setting = Setting(tuple(value), doc, path, is_axis=True)
        else:
            setting = Setting(value, doc, path)
        if setting is not None:
            out[name] = setting
    if "seeds" in raw:
        if "seed" in out:
            ctx.error(doc, base + ("seeds",), "give either seed or seeds, not both", key=True)
        seeds = _seed_setting(raw["seeds"], doc, base + ("seeds",), ctx)
        if seeds is not None:
            out["seedcount" if not seeds.is_axis else "seed"] = seeds
    if "repeat" in raw:
        out["repeat"] = Setting(raw["repeat"], doc, base + ("repeat",))
    return out


def _zip_values(name: str, values: list[Any], cpath: FieldPath, doc: Doc,
                ctx: Context) -> tuple[Any, ...] | None:
    """The values of one zip column, local images resolved (None when refused)."""
    if name != "input_images":
        return tuple(values)
    if not all(isinstance(v, list) for v in values):
        ctx.error(doc, cpath, "input_images in a zip group: each value is a list of images")
        return None
    return tuple(tuple(resolve_ref(r, doc, cpath + (i, j), ctx) for j, r in enumerate(v))
                 for i, v in enumerate(values))


def read_zips(raw: Any, doc: Doc, path: FieldPath, level: Mapping[str, Setting],
              ctx: Context) -> tuple[Zip, ...]:
    """The zip groups listed at ``path``; a name already set at the same ``level`` (or in an
    earlier group) is refused, as is a group whose lists differ in length."""
    groups: list[Zip] = []
    seen: dict[str, FieldPath] = {}
    for g, group in enumerate(raw):
        gpath = path + (g,)
        columns: list[ZipColumn] = []
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
            column = _zip_values(name, values, cpath, doc, ctx)
            if column is not None:
                columns.append((field_name, column, cpath))
        lengths = {len(values) for _, values, _ in columns}
        if len(lengths) > 1:
            detail = ", ".join(f"{f.removeprefix(VAR_PREFIX)} has {len(v)}" for f, v, _ in columns)
            ctx.error(doc, gpath, f"zip lists differ in length: {detail}")
            continue
        if columns:
            groups.append(Zip(doc, gpath, tuple(columns)))
    return tuple(groups)


def read_vars(raw: Mapping[str, Any], doc: Doc, path: FieldPath,
              ctx: Context) -> dict[str, VarSetting]:
    """The template variables at ``path``, each with where it was set; a variable named like
    a fluxParam is refused."""
    out: dict[str, VarSetting] = {}
    for name, value in raw.items():
        if name in FLUX_PARAM_NAMES:
            ctx.error(doc, path + (name,), f"{name!r} is a fluxParam name; set it as a param, "
                      "or name the variable differently", key=True)
            continue
        out[name] = (value, doc, path + (name,))
    return out
