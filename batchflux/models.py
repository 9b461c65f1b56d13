"""Frozen values that cross module boundaries. Imports nothing of batchflux's own."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "flux-2-dev"

#: Every key ``fluxParams`` may carry for flux-2-dev, in canonical order.
FLUX_PARAM_NAMES: tuple[str, ...] = (
    "aspect_ratio",
    "width",
    "height",
    "seed",
    "output_format",
    "output_quality",
    "go_fast",
    "input_images",
)

#: What the API does when a param is omitted (REFERENCE.md, decision 2). batchflux always sends
#: a concrete value for each of these so that every result line records what produced it.
FLUX_DEFAULTS: Mapping[str, Any] = {
    "aspect_ratio": "1:1",
    "output_format": "webp",
    "output_quality": 80,
    "go_fast": True,
}

#: The models that share the ``fluxParams`` block.
FLUX_MODELS: tuple[str, ...] = (
    "flux-2-dev",
    "flux-2-pro",
    "flux-2-flex",
    "flux-2-max",
    "flux-1.1-pro",
    "flux-1.1-pro-ultra",
)


class ErrorCategory(str, enum.Enum):
    """Why an item (or one request) failed. Each has a retryable default and an explanation."""

    INVALID_REQUEST = "invalid_request"
    AUTH = "auth"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    NETWORK = "network"
    TIMEOUT = "timeout"
    GENERATION_FAILED = "generation_failed"
    DOWNLOAD_FAILED = "download_failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE

    @property
    def explanation(self) -> str:
        return _EXPLANATIONS[self]


_RETRYABLE = frozenset(
    {
        ErrorCategory.RATE_LIMITED,
        ErrorCategory.SERVER_ERROR,
        ErrorCategory.NETWORK,
        ErrorCategory.TIMEOUT,
        ErrorCategory.DOWNLOAD_FAILED,
        ErrorCategory.LOST,
    }
)

_EXPLANATIONS = {
    ErrorCategory.INVALID_REQUEST: "the API rejected the request (400); fix the manifest",
    ErrorCategory.AUTH: "the API key is missing, invalid or inactive (401/403)",
    ErrorCategory.INSUFFICIENT_CREDITS: "the team has too few credits for the job (402)",
    ErrorCategory.RATE_LIMITED: "the API asked us to slow down (429) more often than retries allow",
    ErrorCategory.SERVER_ERROR: "the API failed on its side (5xx) on every attempt",
    ErrorCategory.NETWORK: "the connection failed or dropped on every attempt",
    ErrorCategory.TIMEOUT: "a request or the job itself took longer than its deadline",
    ErrorCategory.GENERATION_FAILED: "the job ended FAILED (content policy, or no capacity)",
    ErrorCategory.DOWNLOAD_FAILED: "the image could not be downloaded whole or did not verify",
    ErrorCategory.EXPIRED: "the job's images were purged before they could be downloaded",
    ErrorCategory.CANCELLED: "the job was cancelled",
    ErrorCategory.LOST: "the API no longer knew a journaled job (it forgets jobs after about "
    "24 h); a new job was submitted for the item",
}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure as recorded on a result line."""

    category: ErrorCategory
    message: str
    retryable: bool
    http_status: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category.value,
            "message": self.message,
            "retryable": self.retryable,
            "http_status": self.http_status,
        }


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One paid request: a fully resolved prompt and every fluxParam, with a stable identity.

    ``params`` is the ``fluxParams`` object exactly as it will be sent, except that entries of
    ``input_images`` that are local files are absolute paths (the runner uploads them and sends
    the returned URL instead). ``params["seed"]`` is always a concrete integer.

    ``key`` is the hex sha256 of the canonical request (model, prompt, params, with local files
    replaced by their content hash). It names the item's files, joins it to its result line
    and derives its ``Idempotency-Key``; adding items to a manifest never changes it.
    """

    index: int
    key: str
    prompt_id: str
    prompt: str
    params: Mapping[str, Any]
    model: str = DEFAULT_MODEL
    template: str | None = None
    vars: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None  # "FILE:LINE" of the manifest entry, for messages
    #: Metadata the manifest attached to the prompt (CSV/TSV ``meta_columns``, or ``meta`` on a
    #: JSONL item or YAML entry): column name -> text. Not part of the request, so not of ``key``.
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    def idempotency_key(self, submission: int = 0) -> str:
        """The ``Idempotency-Key`` of this item's ``submission``-th job (0 for the first).

        A retry of the same submit (a lost response) reuses it, so the API replays the original
        job; a deliberate new job (after a transient FAILED) takes the next number.
        """
        return f"batchflux-{self.key[:48]}-{submission}"

    @property
    def local_inputs(self) -> tuple[str, ...]:
        return tuple(
            ref for ref in self.params.get("input_images", ()) if not is_remote_ref(ref)
        )


def is_remote_ref(ref: str) -> bool:
    """True for an ``input_images`` entry the API can fetch itself (http or https URL)."""
    return ref.startswith(("http://", "https://"))


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Run settings that may live in a manifest's ``run:`` block; the command line overrides.

    ``None`` means "not set here": the next layer (command line > manifest > default) decides.
    """

    out_dir: str | None = None
    filename_template: str | None = None
    concurrency: int | None = None  # -j: jobs in flight (submitted, not yet finished)
    rpm: float | None = None  # submit requests per minute
    max_inflight: int | None = None  # expert ceiling on jobs in flight; None: -j
    retries: int | None = None  # attempts per item after the first
    budget: float | None = None  # credits
    max_items: int | None = None
    job_timeout: float | None = None  # seconds per job, submit to COMPLETED
    cost_per_image: float | None = None  # credits, for plan estimates

    def merged(self, override: RunOptions) -> RunOptions:
        """Values of ``override`` where set, else ours."""
        return RunOptions(
            **{
                name: (getattr(override, name) if getattr(override, name) is not None
                       else getattr(self, name))
                for name in self.__dataclass_fields__
            }
        )


DEFAULT_RUN_OPTIONS = RunOptions(
    out_dir="out",
    filename_template="{prompt_id}/{key12}_{seed}_{aspect}.{ext}",
    concurrency=32,
    rpm=None,
    max_inflight=None,
    retries=4,
    budget=None,
    max_items=100_000,
    job_timeout=600.0,
    cost_per_image=2.0,
)


# ============================================================================= manifest values
# The values a manifest is read into (batchflux.manifest) and expanded from (batchflux.expand).
# They live here, not beside their readers, so that expand and plan depend on values only and
# the readers depend on expand, never the other way round. (This section was appended whole so
# that the rest of this module could change at the same time; its imports can join the ones at
# the top.)

from collections.abc import Sequence
from pathlib import Path


@dataclass(frozen=True, slots=True, order=True)
class Diagnostic:
    """One problem in a manifest, located exactly: ``FILE:LINE:COL: field.path: message``.

    ``line`` and ``col`` are 1-based; 0 means "the whole file" (e.g. an empty file).
    Sorting diagnostics sorts them by file, then position, then field.

    >>> str(Diagnostic("job.yaml", 3, 9, "grid.seeds", "empty seed range"))
    'job.yaml:3:9: grid.seeds: empty seed range'
    """

    file: str
    line: int
    col: int
    field: str
    message: str

    def __str__(self) -> str:
        field = self.field or "(root)"
        return f"{self.file}:{self.line}:{self.col}: {field}: {self.message}"


@dataclass(frozen=True, slots=True)
class Axis:
    """One axis of an entry's grid: one or more zipped columns of equal length.

    A field is a fluxParam name or ``"vars.<name>"`` for a template variable. Columns may be
    ``range`` objects, so a seed range of a million values costs nothing.

    >>> len(Axis("seed", ("seed",), (range(1, 101),)))
    100
    """

    name: str
    fields: tuple[str, ...]
    columns: tuple[Sequence[Any], ...]

    def __len__(self) -> int:
        return len(self.columns[0])


@dataclass(frozen=True, slots=True)
class PromptEntry:
    """One prompt of the manifest with everything fixed or varied for it, already resolved.

    ``parts`` is the parsed template: (literal text, variable name or None) pairs; a literal
    prompt is a single part. ``params`` holds the fixed fluxParams (local input images as
    absolute paths); ``vars`` the fixed template variables the template uses; ``meta`` the
    entry's metadata (column name -> text), copied onto each of its items.
    """

    prompt_id: str
    text: str
    parts: tuple[tuple[str, str | None], ...]
    is_template: bool
    vars: Mapping[str, Any]
    params: Mapping[str, Any]
    axes: tuple[Axis, ...] = ()
    repeat: int = 1
    source: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """The number of items this entry expands to."""
        size = self.repeat
        for axis in self.axes:
            size *= len(axis)
        return size


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated manifest, ready to expand (``batchflux.expand.expand_job``).

    ``options`` holds only what the manifest's ``run:`` block set (unset fields are None);
    merge with ``DEFAULT_RUN_OPTIONS.merged(spec.options).merged(cli_options)``.
    ``image_hashes`` maps each local reference image (absolute path) to
    ``"sha256:<hex>"`` of its content; ``warnings`` are non-fatal findings for ``plan``.
    """

    path: Path
    model: str
    options: RunOptions
    entries: tuple[PromptEntry, ...]
    image_hashes: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[Diagnostic, ...] = ()
    format: str = "yaml"
