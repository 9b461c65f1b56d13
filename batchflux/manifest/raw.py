"""What the readers hand to the resolver: values with the place each one was written.

A :class:`RawEntry` is one prompt as a source gave it (a YAML entry, a JSONL line, a CSV
row), its fluxParams already read into :class:`Setting` values and its zip groups into
:class:`Zip` values, each remembering its :class:`~batchflux.manifest.positions.Doc` and
field path. The :class:`Context` carries what the whole manifest shares (model, defaults and
grid, top-level vars) and collects every diagnostic and every local reference image.
These values never leave the package: :func:`~batchflux.manifest.load_job` turns them into
the frozen :class:`~batchflux.models.PromptEntry` values of a
:class:`~batchflux.models.JobSpec`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..models import DEFAULT_MODEL, Diagnostic
from .positions import Doc, FieldPath

__all__ = ["Context", "ImageUse", "RawEntry", "Setting", "VarSetting", "Zip", "ZipColumn"]

#: One place a local reference image is named: the document, the field path, the text written.
ImageUse = tuple[Doc, FieldPath, str]
#: A template variable's value (a scalar, or a list for an axis) and where it was set.
VarSetting = tuple[Any, Doc, FieldPath]
#: One column of a zip group: field (fluxParam or ``vars.<name>``), its values, its path.
ZipColumn = tuple[str, tuple[Any, ...], FieldPath]


@dataclass(frozen=True, slots=True)
class Setting:
    """One fluxParam (or ``seed``/``seedcount``/``repeat``) value set at one level.

    ``value`` is a scalar, a tuple of image references, or, when ``is_axis``, a column of
    values (a tuple, or a ``range`` for a seed range).
    """

    value: Any
    doc: Doc
    path: FieldPath
    is_axis: bool = False


@dataclass(frozen=True, slots=True)
class Zip:
    """One zip group: columns of equal length that form a single axis."""

    doc: Doc
    path: FieldPath
    columns: tuple[ZipColumn, ...]

    def without(self, drop: set[str] | frozenset[str]) -> Zip:
        """This group without the columns whose field is in ``drop``."""
        return Zip(self.doc, self.path, tuple(c for c in self.columns if c[0] not in drop))


@dataclass(frozen=True, slots=True)
class RawEntry:
    """One prompt as its source gave it, read but not yet resolved against the manifest."""

    doc: Doc
    path: FieldPath  # the entry itself
    text: str
    text_path: FieldPath
    is_template: bool
    id: str | None
    id_path: FieldPath
    position: int  # 1-based: the derived id is p{position:04d}
    settings: Mapping[str, Setting] = field(default_factory=dict)
    zips: tuple[Zip, ...] | None = None  # None: inherit the grid's
    vars: Mapping[str, VarSetting] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def prompt_id(self) -> str:
        """The given id, or the one derived from the position (``p0001``...)."""
        return self.id or f"p{self.position:04d}"


@dataclass
class Context:
    """What a whole manifest shares, plus the collector of diagnostics and image references.

    ``base`` is the defaults and grid of a YAML manifest, resolved (grid wins);
    ``images`` maps each local reference image (absolute path) to every place naming it.
    """

    diagnostics: list[Diagnostic]
    images: dict[str, list[ImageUse]] = field(default_factory=dict)
    model: str = DEFAULT_MODEL
    base: dict[str, Setting] = field(default_factory=dict)
    base_zip: tuple[Zip, ...] = ()
    vars: dict[str, VarSetting] = field(default_factory=dict)

    def error(self, doc: Doc, path: FieldPath, message: str, *, key: bool = False) -> None:
        """Record a diagnostic at ``path`` of ``doc`` (at its key, with ``key=True``)."""
        self.diagnostics.append(doc.at(path, message, key=key))

    def errors_since(self, count: int) -> bool:
        """True when diagnostics were added since there were ``count`` of them."""
        return len(self.diagnostics) > count
