"""Frozen values that cross module boundaries. Imports nothing of batchflux's own."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    """Why an item (or one request) failed. Each has a retryable default and an explanation.

    >>> from batchflux import ErrorCategory
    >>> ErrorCategory("rate_limited").retryable, ErrorCategory.AUTH.retryable
    (True, False)
    >>> ErrorCategory.EXPIRED.explanation
    "the job's images were purged before they could be downloaded"
    """

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
    ErrorCategory.RATE_LIMITED: ("the API kept asking us to slow down (429) for longer than "
                                 "max_total allows"),
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


@dataclass
class RunState:
    """The live numbers of a run, for the progress display (reporters only read them)."""

    total: int | None = None
    done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    inflight: int = 0  # jobs the provider has (accepted, not yet seen finished)
    inflight_cap: int = 0
    cooldown_remaining: float = 0.0
    credits_spent: float = 0.0
    started: float = 0.0
    stop_reason: str | None = None


class RecordError(ValueError):
    """A result line that is not a result record (wrong shape or type); readers skip it."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure as recorded on a result line.

    >>> ErrorInfo(ErrorCategory.TIMEOUT, "job j1 not finished after 600 s", True).to_json()
    {'category': 'timeout', 'message': 'job j1 not finished after 600 s', 'retryable': True, \
'http_status': None}
    """

    category: ErrorCategory
    message: str
    retryable: bool
    http_status: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``error`` object of a result line (schemas/result.schema.json)."""
        return {
            "category": self.category.value,
            "message": self.message,
            "retryable": self.retryable,
            "http_status": self.http_status,
        }

    @classmethod
    def from_json(cls, data: Any) -> ErrorInfo:
        """Read an ``error`` object back; :class:`RecordError` when it is not one."""
        if not isinstance(data, Mapping):
            raise RecordError("error is not an object")
        try:
            category = ErrorCategory(data.get("category"))
        except ValueError as exc:
            raise RecordError(f"unknown error category {data.get('category')!r}") from exc
        status = data.get("http_status")
        return cls(category, _text(data.get("message"), "error.message"),
                   bool(data.get("retryable")), status if isinstance(status, int) else None)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One stored image of an item: where it is (relative to the output directory, with
    ``/``), its sha256 and size, and how it was verified (``decode`` or ``structure``).

    >>> from batchflux import read_results
    >>> image = read_results("out/nightly").ordered()[0].files[0]
    >>> image.check, len(image.sha256), image.bytes > 0
    ('decode', 64, True)
    """

    path: str
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
    check: str = "decode"

    def to_json(self) -> dict[str, Any]:
        """One entry of a result line's ``files``."""
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes,
                "width": self.width, "height": self.height, "format": self.format,
                "check": self.check}

    @classmethod
    def from_json(cls, data: Any) -> FileRecord:
        """Read a ``files`` entry back; :class:`RecordError` when it is not one."""
        if not isinstance(data, Mapping):
            raise RecordError("a files entry is not an object")
        return cls(_text(data.get("path"), "files.path"), _text(data.get("sha256"), "sha256"),
                   _count(data.get("bytes"), "files.bytes"), _count(data.get("width"), "width"),
                   _count(data.get("height"), "height"), _text(data.get("format"), "format"),
                   str(data.get("check") or "decode"))


@dataclass(frozen=True, slots=True)
class Timings:
    """Where an item's time went, in seconds: submit to the job's end (``generating``),
    downloading and verifying, and the whole item (None: did not happen)."""

    generating: float | None = None
    downloading: float | None = None
    total: float | None = None

    def to_json(self) -> dict[str, float | None]:
        """The ``timings`` object of a result line."""
        return {"generating": self.generating, "downloading": self.downloading,
                "total": self.total}

    @classmethod
    def from_json(cls, data: Any) -> Timings:
        """Read ``timings`` back (missing or odd values are None)."""
        if not isinstance(data, Mapping):
            return cls()
        return cls(*(_seconds(data.get(name)) for name in ("generating", "downloading",
                                                             "total")))


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one item: one line of ``results.jsonl``
    (``schemas/result.schema.json``; :meth:`to_json` and :meth:`from_json` round-trip it).

    The last line for a key wins (an ok line beats a failed one). ``credit_cost`` is what the
    job cost; ``replayed`` says the API answered with a job this run did not create (it did not
    pay); ``duplicate_of`` is set on an item whose request is an earlier item's (same key).

    >>> from batchflux import read_results
    >>> result = read_results("out/nightly").ordered()[0]
    >>> result.ok, result.prompt_id, result.seed, result.files[0].path
    (True, 'lighthouse', 11, 'images/lighthouse/11_16x9_....webp')
    >>> type(result).from_json(result.to_json()) == result
    True
    """

    key: str
    index: int
    prompt_id: str
    status: str  # "ok" | "failed"
    model: str
    prompt: str
    seed: int
    params: Mapping[str, Any]
    template: str | None = None
    vars: Mapping[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    submission: int = 0
    jobs: int = 0
    polls: int = 0
    credit_cost: float | None = None
    replayed: bool = False
    error: ErrorInfo | None = None
    files: tuple[FileRecord, ...] = ()
    timings: Timings = field(default_factory=Timings)
    started_at: str = ""
    finished_at: str = ""
    source: str | None = None
    duplicate_of: int | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    reroll_of: str | None = None
    attempt: int = 0

    @property
    def ok(self) -> bool:
        """True when the item's images are stored."""
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """The result line. ``key`` comes first and ``status`` before any nested object: the
        resume index reads ok lines by that shape (:data:`OK_LINE`) without parsing them."""
        line: dict[str, Any] = {
            "key": self.key,
            "index": self.index,
            "prompt_id": self.prompt_id,
            "status": self.status,
            "model": self.model,
            "prompt": self.prompt,
            "template": self.template,
            "vars": dict(self.vars),
            "seed": self.seed,
            "params": dict(self.params),
            "job_id": self.job_id,
            "submission": self.submission,
            "jobs": self.jobs,
            "polls": self.polls,
            "credit_cost": self.credit_cost,
            "replayed": self.replayed,
            "error": None if self.error is None else self.error.to_json(),
            "files": [f.to_json() for f in self.files],
            "timings": self.timings.to_json(),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "source": self.source,
            "meta": dict(self.meta),
        }
        if self.duplicate_of is not None:
            line["duplicate_of"] = self.duplicate_of
        if self.reroll_of is not None:
            line["reroll_of"] = self.reroll_of
            line["attempt"] = self.attempt
        return line

    @classmethod
    def from_json(cls, data: Any) -> Result:
        """Read a result line back (lines of older runs lack some optional fields: they get
        their defaults). :class:`RecordError` when it is not a result line."""
        if not isinstance(data, Mapping):
            raise RecordError("not a JSON object")
        status = data.get("status")
        if status not in ("ok", "failed"):
            raise RecordError(f"status is {status!r}, not ok or failed")
        files = data.get("files") or ()
        if not isinstance(files, (list, tuple)):
            raise RecordError("files is not a list")
        error = data.get("error")
        params = data.get("params")
        seed = data.get("seed")
        return cls(
            key=_text(data.get("key"), "key"),
            index=_count(data.get("index"), "index", minimum=0),
            prompt_id=str(data.get("prompt_id") or ""),
            status=status,
            model=str(data.get("model") or DEFAULT_MODEL),
            prompt=str(data.get("prompt") or ""),
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
            params=dict(params) if isinstance(params, Mapping) else {},
            template=data.get("template") if isinstance(data.get("template"), str) else None,
            vars=dict(data["vars"]) if isinstance(data.get("vars"), Mapping) else {},
            job_id=data.get("job_id") if isinstance(data.get("job_id"), str) else None,
            submission=_int_or(data.get("submission"), 0),
            jobs=_int_or(data.get("jobs"), 0),
            polls=_int_or(data.get("polls"), 0),
            credit_cost=_seconds(data.get("credit_cost")),
            replayed=data.get("replayed") is True,
            error=None if error is None else ErrorInfo.from_json(error),
            files=tuple(FileRecord.from_json(f) for f in files),
            timings=Timings.from_json(data.get("timings")),
            started_at=str(data.get("started_at") or ""),
            finished_at=str(data.get("finished_at") or ""),
            source=data.get("source") if isinstance(data.get("source"), str) else None,
            duplicate_of=data.get("duplicate_of") if isinstance(data.get("duplicate_of"), int)
            else None,
            meta=_meta(data.get("meta")),
            reroll_of=data.get("reroll_of") if isinstance(data.get("reroll_of"), str) else None,
            attempt=_int_or(data.get("attempt"), 0),
        )


#: An ok line as :meth:`Result.to_json` writes it, recognised without a JSON parse: the
#: first 16 hex digits of its key (group 1). The fields before ``status`` are matched one by
#: one (``prompt_id`` as a whole JSON string, escapes and all), so the match is the line's own
#: fields whatever its strings hold. Lines of every earlier version have the same first four
#: fields in this order; any other line is parsed in full.
OK_LINE = re.compile(
    rb'\{"key":"([0-9a-f]{16})[0-9a-f]*","index":[0-9]+,"prompt_id":"(?:[^"\\]|\\.)*",'
    rb'"status":"ok"')
#: The ``files`` list of such a line (group 1), to parse alone: a JSON string cannot contain
#: ``,"files":[`` unescaped, so the first match is the field.
FILES_FIELD = re.compile(rb',"files":(\[.*?\]),"timings":')


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecordError(f"{name} is not a non-empty string")
    return value


def _count(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecordError(f"{name} is not an integer >= {minimum}")
    return value


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _meta(value: Any) -> dict[str, str]:
    """A line's ``meta`` (absent on lines of runs before meta existed: empty); a value that is
    not text (a hand-edited line) is kept as its JSON text."""
    if not isinstance(value, Mapping):
        return {}
    return {str(name): text if isinstance(text, str)
            else json.dumps(text, sort_keys=True, ensure_ascii=False)
            for name, text in value.items()}


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One paid request: a fully resolved prompt and every fluxParam, with a stable identity.

    ``params`` is the ``fluxParams`` object exactly as it will be sent, except that entries of
    ``input_images`` that are local files are absolute paths (the runner uploads them and sends
    the returned URL instead). ``params["seed"]`` is always a concrete integer.

    ``key`` is the hex sha256 of the canonical request (model, prompt, params, with local files
    replaced by their content hash). It names the item's files, joins it to its result line
    and derives its ``Idempotency-Key``; adding items to a manifest never changes it.

    >>> from batchflux import expand_job, load_job
    >>> item = next(expand_job(load_job("jobs/nightly.yaml")))
    >>> item.index, item.prompt_id, item.params["seed"], item.params["aspect_ratio"], len(item.key)
    (0, 'lighthouse', 11, '16:9', 64)
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
    #: On a reroll (batchflux.reroll): the key of the item it rerolls, and which reroll it is.
    reroll_of: str | None = None
    attempt: int = 0

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
class WebhookRequest:
    """The webhook fields a submit carries (``webhookUrl``, ``webhookEvents``): journaled
    with the submit, so that a resend carries exactly the same ones."""

    url: str
    events: tuple[str, ...] = ("completed", "failed")

    def body_fields(self) -> dict[str, Any]:
        """The fields as the request body spells them."""
        return {"webhookUrl": self.url, "webhookEvents": list(self.events)}


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Run settings, as one layer gives them: the defaults, a manifest's ``run:`` block (its
    first twelve fields), or the caller (the command line, the library's ``options=``).

    ``None`` means "not set here": the next layer (caller > manifest > default) decides.
    :func:`batchflux.config.resolve_config` merges the layers and checks them.

    >>> from batchflux import RunOptions
    >>> RunOptions(budget=40).merged(RunOptions(budget=10, concurrency=8)).budget
    10
    >>> RunOptions(budget=40).merged(RunOptions(concurrency=8)).budget    # None: not set here
    40
    """

    out_dir: str | Path | None = None
    filename_template: str | None = None
    concurrency: int | None = None  # -j: jobs in flight (submitted, not yet finished)
    rpm: float | None = None  # submit requests per minute
    max_inflight: int | None = None  # expert ceiling on jobs in flight; None: -j
    retries: int | None = None  # attempts per item after the first
    budget: float | None = None  # credits
    max_items: int | None = None
    job_timeout: float | None = None  # seconds per job, submit to COMPLETED
    cost_per_image: float | None = None  # credits, for plan estimates
    webhook_url: str | None = None  # the public URL Apiframe POSTs job events to
    webhook_listen: str | None = None  # HOST:PORT of batchflux's own receiver
    # Settings of one invocation (the command line or the library; a manifest has none):
    retry_failed: str | None = None  # "retryable" or "all": retry earlier failures too
    fresh: bool | None = None  # move an existing output directory aside first
    verify: str | None = None  # "auto", "decode" or "structure"
    max_failure_rate: float | None = None  # exit 0 when at most this share failed
    dataset: str | None = None  # "hf" or "webdataset": export after the run
    shard: str | None = None  # "I/N": only the items of shard I of N
    limit: int | None = None  # run at most this many of the items still to do
    fill_budget: bool | None = None  # run as many of them as ``budget`` pays for, then stop
    reroll: str | None = None  # "rejected": a new image for each item whose image was rejected

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
# the readers depend on expand, never the other way round.


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

    >>> from batchflux import load_job
    >>> spec = load_job("jobs/nightly.yaml")
    >>> spec.path.name, [entry.prompt_id for entry in spec.entries][:3]
    ('nightly.yaml', ['lighthouse', 'market', 'cabin'])
    """

    path: Path
    model: str
    options: RunOptions
    entries: tuple[PromptEntry, ...]
    image_hashes: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[Diagnostic, ...] = ()
    format: str = "yaml"
