"""Export a finished run directory as a training dataset: ``--dataset hf|webdataset``.

``hf`` writes the Hugging Face ImageFolder layout, loadable with
``datasets.load_dataset("imagefolder", data_dir="OUT/dataset/hf")``::

    OUT/dataset/hf/train/metadata.jsonl      one row per image: file_name, text (the prompt),
                                             seed, prompt_id, key, aspect_ratio, width,
                                             height, output_format, model, params (JSON text),
                                             template, job_id, decision, and one column per
                                             meta name (sku, category, ...)
    OUT/dataset/hf/train/<prompt id>/...     the images (hard links into images/ when possible)

``webdataset`` writes tar shards of at most ``shard_size`` samples, readable by the
``webdataset`` package (``wds.WebDataset("OUT/dataset/webdataset/shard-{000000..000003}.tar")``)::

    OUT/dataset/webdataset/shard-000000.tar  <sample>.jpg|png|webp  the image
                                             <sample>.txt           the prompt
                                             <sample>.json          seed, params, key, ...

Each item's ``meta`` (from the manifest's ``meta_columns`` or ``meta``; ``"meta"`` on its
result line) becomes columns of their own, in both formats: every meta name of the exported
items is a column of every row (null where an item lacks it), so the Arrow schema is the same
for all rows. A meta name that is already one of the columns above is written as
``meta_<name>`` (``meta_seed``), so a catalogue's own ``model`` column never replaces the
model that made the image.

A sample's name is the item key (plus ``_2``, ``_3``... for extra images of one item). Only
items of the current manifest (:func:`~batchflux.results.split_by_manifest`: the manifest the
latest run ran, rerolls of its items included) whose result is ``ok`` are exported; results of
items the manifest no longer has are left out and counted (``ExportResult.not_in_manifest``)
unless ``include_all`` (``--all``); ``only`` (``--only accepted``, ``--only
accepted,starred``) keeps the items in those review states (``batchflux review`` writes them
to ``OUT/review.jsonl``: ``accepted``, ``rejected``, ``starred``, ``undecided``), and every
row carries its review state as ``decision``. Every image is checked against the sha256 on its
result line as it is linked, copied or read: a missing or different file stops the export with
:class:`~batchflux.errors.IntegrityError` (exit 65) naming the item and the path, and the old
export stays. A results line that cannot be read is skipped and reported
(``ExportResult.bad_lines``). Each export is built in a temporary directory and
swapped in at the end (:func:`batchflux.fileutil.replace_atomic`; ``metadata.jsonl`` is
written with :func:`batchflux.fileutil.write_atomic`), so re-running it (after a resumed run
added items) replaces the old export whole and a crash mid-export leaves the previous one in
place.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .display import item_label
from .errors import IntegrityError, UsageError
from .fileutil import replace_atomic, sha256_file, write_atomic
from .models import Result
from .results import recorded_path, split_by_manifest
from .reviewapp.decisions import STATES, read_decisions, review_state
from .store import RESULTS_NAME, STATE_DIR, BadLine, OnBadLine

__all__ = ["FORMATS", "OWN_COLUMNS", "ExportResult", "dataset_rows", "export_dataset",
           "meta_columns"]

FORMATS = ("hf", "webdataset")
#: The columns every exported row has (``file_name`` in ``hf`` only); meta columns of the same
#: name are renamed ``meta_<name>``.
OWN_COLUMNS = frozenset({"file_name", "text", "seed", "prompt_id", "key", "aspect_ratio", "width",
                         "height", "output_format", "model", "params", "template", "job_id",
                         "decision"})
META_PREFIX = "meta_"
EXPORT_DIR = "dataset"
DEFAULT_SHARD_SIZE = 1000
_EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}


@dataclass(frozen=True, slots=True)
class ExportResult:
    """Where an export went and how many images (rows or samples) it holds."""

    format: str
    path: Path
    rows: int
    shards: int = 0
    bad_lines: tuple[BadLine, ...] = ()  # results.jsonl lines skipped
    #: Items with a result that the manifest no longer has: left out, or with ``include_all``
    #: exported with the rest.
    not_in_manifest: int = 0
    include_all: bool = False


@dataclass(frozen=True, slots=True)
class DatasetRow:
    """One exported image with its caption and parameters."""

    name: str  # sample name: the item key, with a suffix for extra images
    image_path: str  # relative to the run directory (images/...)
    text: str
    metadata: Mapping[str, Any]
    sha256: str = ""  # as recorded on the result line
    label: str = ""  # how messages name the item


def dataset_rows(out_dir: Path, *, on_bad_line: OnBadLine | None = None,
                 only: Collection[str] | None = None,
                 include_all: bool = False) -> Iterator[DatasetRow]:
    """Every image of every ok item of the current manifest (of every item with
    ``include_all``), in manifest order; with ``only``, of the items whose review state is one
    of ``only``. Unreadable results lines are passed to ``on_bad_line`` (see
    :func:`batchflux.results.read_results`)."""
    split = split_by_manifest(out_dir, on_bad_line=on_bad_line)
    yield from _rows(out_dir, split.records(include_all=include_all), only)


def _rows(out_dir: Path, records: Iterable[Result],
          only: Collection[str] | None) -> Iterator[DatasetRow]:
    decisions = read_decisions(out_dir)
    exported: list[tuple[Result, str]] = []
    for record in records:
        if not record.ok:
            continue
        decision = review_state(record.key, decisions)
        if only is not None and decision not in only:
            continue
        exported.append((record, decision))
    columns = meta_columns(record.meta for record, _ in exported)
    for record, decision in exported:
        yield from _rows_of(record, decision, columns)


def meta_columns(metas: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Every meta name of ``metas`` (the ``meta`` of each exported record), in order of first
    use, mapped to its column name (the name itself, or ``meta_<name>`` when that is taken by a
    column of our own or by another meta name).

    >>> meta_columns([{"sku": "A1", "seed": "x"}, {"category": "mugs"}])
    {'sku': 'sku', 'seed': 'meta_seed', 'category': 'category'}
    """
    names: dict[str, None] = {}
    for meta in metas:
        names.update(dict.fromkeys(meta))
    taken = set(OWN_COLUMNS) | set(names)
    columns: dict[str, str] = {}
    for name in names:
        column = name
        while column in OWN_COLUMNS or (column != name and column in taken):
            column = META_PREFIX + column
        taken.add(column)
        columns[name] = column
    return columns


def _rows_of(record: Result, decision: str,
             columns: Mapping[str, str]) -> Iterator[DatasetRow]:
    """The rows of one ok item: one per image file, each with every meta column."""
    meta_row = {column: record.meta.get(name) for name, column in columns.items()}
    params = dict(record.params)
    for number, f in enumerate(record.files, start=1):
        name = record.key if number == 1 else f"{record.key}_{number}"
        yield DatasetRow(
            name=name,
            image_path=f.path,
            text=record.prompt,
            metadata={
                "text": record.prompt,
                "seed": record.seed,
                "prompt_id": record.prompt_id,
                "key": record.key,
                "aspect_ratio": params.get("aspect_ratio"),
                "width": f.width,
                "height": f.height,
                "output_format": f.format,
                "model": record.model,
                # JSON text: params differ in shape between items, and Arrow columns
                # must not (input_images lists, width/height only with custom sizes).
                "params": json.dumps(params, sort_keys=True, ensure_ascii=False),
                "template": record.template,
                "job_id": record.job_id,
                "decision": decision,
                **meta_row,
            },
            sha256=f.sha256,
            label=item_label(record),
        )


def export_dataset(out_dir: str | os.PathLike[str], fmt: str, *,
                   shard_size: int = DEFAULT_SHARD_SIZE,
                   on_bad_line: OnBadLine | None = None,
                   only: Collection[str] | None = None,
                   include_all: bool = False) -> ExportResult:
    """Write (or rewrite) the ``fmt`` export of the run in ``out_dir``: the items of its
    current manifest, or with ``include_all`` every item with a result. See the module doc.

    Raises :class:`~batchflux.errors.IntegrityError` when an image is missing or does not
    match its sha256, :class:`~batchflux.errors.UsageError` for a bad format or directory, or
    an ``only`` that keeps nothing, :class:`~batchflux.errors.RunDirectoryError` when the
    record of the manifest's items is damaged.

    >>> from batchflux import export_dataset
    >>> export = export_dataset("out/nightly", "hf")
    >>> export.path.as_posix(), export.rows
    ('out/nightly/dataset/hf', 12)
    """
    out = Path(out_dir)
    if only is not None:
        unknown = sorted(set(only) - set(STATES))
        if unknown or not only:
            raise UsageError(f"--only takes review states ({', '.join(STATES)}), "
                             f"got {', '.join(unknown) or 'nothing'}")
        only = frozenset(only)
    if fmt not in FORMATS:
        raise UsageError(f"--dataset takes one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (out / RESULTS_NAME).is_file():
        raise UsageError(f"{out} is not a batchflux run directory (no {RESULTS_NAME})")
    if shard_size < 1:
        raise UsageError("the webdataset shard size must be at least 1")
    bad: list[BadLine] = []

    def skipped(line: BadLine) -> None:
        bad.append(line)
        if on_bad_line is not None:
            on_bad_line(line)

    split = split_by_manifest(out, on_bad_line=skipped)
    rows_of = _rows(out, split.records(include_all=include_all), only)
    final = out / EXPORT_DIR / fmt
    work = out / STATE_DIR / f"export-{fmt}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if fmt == "hf":
            rows, shards = _write_imagefolder(out, work, rows_of), 0
        else:
            rows, shards = _write_webdataset(out, work, shard_size, rows_of)
        if only is not None and rows == 0:
            raise UsageError(f"nothing to export: no image is {' or '.join(sorted(only))} "
                             f"(decide with: batchflux review {out})")
        _swap_in(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(format=fmt, path=final, rows=rows, shards=shards, bad_lines=tuple(bad),
                        not_in_manifest=split.not_in_manifest, include_all=include_all)


def _swap_in(work: Path, final: Path) -> None:
    """Replace ``final`` by ``work``: two renames, the old export gone only once the new one
    is complete (and on disk)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        replace_atomic(final, old, durable=False)  # the next rename is the one that counts
    replace_atomic(work, final)
    shutil.rmtree(old, ignore_errors=True)


def _source(out: Path, row: DatasetRow) -> Path:
    """The image of ``row``, refused unless it is inside ``OUT/images`` and exists."""
    path = recorded_path(out, row.image_path)
    if path is None:
        raise IntegrityError(f"item {row.label}: refusing file path {row.image_path!r} from "
                             f"{out / RESULTS_NAME}: outside the run's images/")
    if not path.is_file():
        raise IntegrityError(f"item {row.label}: {path} is listed in {out / RESULTS_NAME} but "
                             f"missing; `batchflux run` on {out} fetches it again "
                             "(`batchflux verify` lists every such file)")
    return path


def _check_digest(out: Path, row: DatasetRow, path: Path, actual: str) -> None:
    if actual != row.sha256:
        raise IntegrityError(
            f"item {row.label}: {path} does not match the sha256 in {out / RESULTS_NAME} "
            f"(found {actual[:12]}, recorded {row.sha256[:12] or 'nothing'}); "
            f"`batchflux verify {out} --fix` moves it aside so that `batchflux run` fetches it "
            "again")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_imagefolder(out: Path, work: Path, rows_of: Iterable[DatasetRow]) -> int:
    train = work / "train"
    train.mkdir()
    rows = 0

    def lines() -> Iterator[bytes]:
        """Each row's metadata line, its image linked (and checked) as the line is made."""
        nonlocal rows
        for row in rows_of:
            source = _source(out, row)
            rel = row.image_path.removeprefix("images/")
            target = train / rel
            _link_or_copy(source, target)
            # Hash what the export now holds (a link shares the source's bytes).
            _check_digest(out, row, source, sha256_file(target))
            line = {"file_name": rel, **row.metadata}
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
            rows += 1

    write_atomic(train / "metadata.jsonl", lines())
    return rows


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_webdataset(out: Path, work: Path, shard_size: int,
                      rows_of: Iterable[DatasetRow]) -> tuple[int, int]:
    rows = shards = 0
    tar: tarfile.TarFile | None = None
    try:
        for row in rows_of:
            image = _source(out, row)
            data = image.read_bytes()
            _check_digest(out, row, image, hashlib.sha256(data).hexdigest())
            if rows % shard_size == 0:
                if tar is not None:
                    tar.close()
                # Rolled over every shard_size samples; the finally below closes the last.
                tar = tarfile.open(work / f"shard-{shards:06d}.tar", "w",  # noqa: SIM115
                                   format=tarfile.USTAR_FORMAT)
                shards += 1
            assert tar is not None
            suffix = image.suffix.lstrip(".").lower()
            ext = _EXTENSIONS.get(suffix, suffix)
            mtime = image.stat().st_mtime
            # webdataset groups members by the name before the first dot: keys are hex.
            _add_bytes(tar, f"{row.name}.{ext}", data, mtime)
            _add_bytes(tar, f"{row.name}.txt", row.text.encode("utf-8"), mtime)
            _add_bytes(tar, f"{row.name}.json",
                       json.dumps(dict(row.metadata), ensure_ascii=False).encode("utf-8"),
                       mtime)
            rows += 1
    finally:
        if tar is not None:
            with contextlib.suppress(OSError):
                tar.close()
    return rows, shards
