"""The one exception tree of batchflux.

::

    BatchfluxError                      base of everything batchflux raises on purpose
    ├── UsageError                      bad command line                       exit 2
    ├── ManifestError                   invalid manifest (all diagnostics)     exit 65
    ├── ConfigError                     no key, bad base URL, ...              exit 78
    ├── OutputLockedError               another run holds the output dir       exit 75
    ├── IntegrityError                  a recorded file is missing or differs  exit 65
    │                                   from its result line (export, merge)
    ├── RunDirectoryError               a run directory's own record in        exit 65
    │                                   .batchflux/ is damaged (item keys)
    ├── MergeError                      run directories that cannot be merged  exit 1
    ├── FilenameTemplateError           a file-name template cannot render     exit 2
    ├── ImageCheckError                 a downloaded file is not the image the job promised
    │                                   (the lifecycle fetches it again; never reaches you)
    ├── ApiError                        one HTTP exchange with Apiframe failed
    │                                   (.category, .retryable, .http_status, .retry_after)
    └── RunAborted                      a run-fatal condition stopped the run cleanly
                                        (auth, credits, budget, unwritable output;
                                        .summary: summary.json as it was written)

Foreign exceptions (httpx, yaml, jsonschema, OSError) are translated once, at the adapter that
meets them, with ``raise ... from exc``. Per-item failures are *data* (an ``ErrorInfo`` on a
result line), never exceptions that escape the runner.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .models import Diagnostic, ErrorCategory

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_DATAERR = 65  # sysexits EX_DATAERR: invalid manifest, a file that fails its sha256
EXIT_SOFTWARE = 70  # sysexits EX_SOFTWARE: a bug in batchflux
EXIT_CANTCREAT = 73  # sysexits EX_CANTCREAT: the output directory cannot be written
EXIT_TEMPFAIL = 75  # sysexits EX_TEMPFAIL: provider unavailable, output locked
EXIT_CONFIG = 78  # sysexits EX_CONFIG: no API key, bad configuration
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class BatchfluxError(Exception):
    """Base class for every error batchflux raises on purpose.

    >>> from batchflux import BatchfluxError, load_job
    >>> try:
    ...     load_job("jobs/no-such-manifest.yaml")
    ... except BatchfluxError as exc:
    ...     print(type(exc).__name__, exc.exit_code)
    ManifestError 65
    """

    exit_code: int = EXIT_ITEMS_FAILED


class UsageError(BatchfluxError):
    exit_code = EXIT_USAGE


class ConfigError(BatchfluxError):
    """The environment or a setting outside the manifest is wrong (a key the client refuses, a
    base URL, a port that is taken): exit 78, nothing spent.

    >>> from batchflux import Api, ConfigError, run_batch
    >>> try:
    ...     run_batch("jobs/nightly.yaml", target=Api("afk_x", base_url="http://api.example.com"))
    ... except ConfigError as exc:
    ...     print(exc.exit_code)
    78
    """

    exit_code = EXIT_CONFIG


class OutputLockedError(BatchfluxError):
    """Another process holds the run directory's lock (it names the holder's pid): exit 75.

    >>> from batchflux import OutputLockedError
    >>> OutputLockedError.exit_code    # EX_TEMPFAIL: cron and systemd try again later
    75
    """

    exit_code = EXIT_TEMPFAIL


class IntegrityError(BatchfluxError):
    """A file a result line lists is missing, or its content is not what the line recorded
    (sha256). Raised before anything is copied on from it; ``batchflux verify OUT --fix``
    moves such files aside so that the next ``batchflux run`` fetches them again.

    >>> import shutil
    >>> from pathlib import Path
    >>> from batchflux import IntegrityError, export_dataset, read_results
    >>> _ = shutil.copytree("out/nightly", "out/damaged")
    >>> image = Path("out/damaged", read_results("out/damaged").ordered()[0].files[0].path)
    >>> _ = image.write_bytes(image.read_bytes()[:-1] + b"?")    # one byte changed
    >>> try:
    ...     export_dataset("out/damaged", "hf")
    ... except IntegrityError as exc:
    ...     print(exc.exit_code, "sha256" in str(exc))
    65 True
    """

    exit_code = EXIT_DATAERR


class ManifestError(BatchfluxError):
    """A manifest is invalid. Carries every diagnostic found, sorted.

    >>> from pathlib import Path
    >>> from batchflux import ManifestError, load_job
    >>> _ = Path("bad.yaml").write_text("version: 1\\nmodel: flux-2-dev\\nprompts: [{text: 7}]")
    >>> try:
    ...     load_job("bad.yaml")
    ... except ManifestError as exc:
    ...     print(exc.diagnostics[0])
    bad.yaml:3:...
    """

    exit_code = EXIT_DATAERR

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics: tuple[Diagnostic, ...] = tuple(sorted(diagnostics))
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class ApiError(BatchfluxError):
    """One exchange with the API failed.

    ``category`` says what kind of failure it was and ``retryable`` whether trying the same
    request again can help. ``retry_after`` is the server's ``Retry-After`` in seconds, if any.
    The message never contains the API key.

    >>> from batchflux import ApiError, ErrorCategory
    >>> error = ApiError("429 Too Many Requests", category=ErrorCategory.RATE_LIMITED,
    ...                  retryable=True, retry_after=2.0)
    >>> error.category.value, error.retryable, error.retry_after
    ('rate_limited', True, 2.0)
    """

    def __init__(
        self,
        message: str,
        *,
        category: ErrorCategory,
        retryable: bool | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.category = category
        self.retryable = category.retryable if retryable is None else retryable
        self.http_status = http_status
        self.retry_after = retry_after
        self.details = details or {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, category={self.category.value!r}, "
            f"retryable={self.retryable}, http_status={self.http_status})"
        )


class RunDirectoryError(BatchfluxError):
    """A file batchflux keeps in a run directory's ``.batchflux/`` cannot be read as written
    (the item keys of its manifest: cut short, out of order, not a file). The message names
    the file and how to make it again (re-run the manifest)."""

    exit_code = EXIT_DATAERR


class MergeError(BatchfluxError):
    """The sources cannot be merged (different manifests, conflicting or corrupt files)."""


class FilenameTemplateError(BatchfluxError, ValueError):
    """A file-name template cannot render a name."""

    exit_code = EXIT_USAGE


class ImageCheckError(BatchfluxError, ValueError):
    """The file is not the image the job promised (truncated, padded, wrong size...)."""


class RunAborted(BatchfluxError):
    """A run-fatal condition stopped the run cleanly (in-flight jobs were journaled).

    ``summary`` is the run's summary.json as it was written (None when the run stopped
    before it started), ``out_dir`` its output directory, ``simulated`` whether it ran on
    the built-in simulator.

    >>> from batchflux import RunAborted, RunOptions, Simulator, run_batch
    >>> try:
    ...     run_batch("jobs/nightly.yaml", RunOptions(out_dir="out/broke"),
    ...               target=Simulator(job_seconds=0.1, credits=10))
    ... except RunAborted as exc:
    ...     print(exc.exit_code, exc.summary["counts"]["ok"])
    ...
    1 5
    """

    def __init__(self, message: str, *, category: ErrorCategory | None = None,
                 exit_code: int = EXIT_ITEMS_FAILED) -> None:
        super().__init__(message)
        self.category = category
        self.exit_code = exit_code
        self.summary: dict[str, Any] | None = None
        self.out_dir: Path | None = None
        self.simulated = False
