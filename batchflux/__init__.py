"""batchflux: run many flux-2-dev generations through Apiframe's v2 API, safely and fast.

>>> from batchflux import RunOptions, Simulator, run_batch
>>> result = run_batch("jobs/nightly.yaml", RunOptions(out_dir="out/x"),
...                    target=Simulator())
>>> result.exit_code, result.summary["counts"]["ok"]
(0, 12)

The names below are the public library API; they are imported on first use, so that
``import batchflux`` (and the command line's start-up) stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "run_batch": "batchflux.batch",
    "run_batch_async": "batchflux.batch",
    "RunResult": "batchflux.batch",
    "Simulator": "batchflux.config",
    "Api": "batchflux.config",
    "RunConfig": "batchflux.config",
    "resolve_config": "batchflux.config",
    "Result": "batchflux.models",
    "FileRecord": "batchflux.models",
    "ErrorInfo": "batchflux.models",
    "load_job": "batchflux.manifest",
    "JobSpec": "batchflux.models",
    "expand_job": "batchflux.expand",
    "count_items": "batchflux.expand",
    "WorkItem": "batchflux.models",
    "RunOptions": "batchflux.models",
    "ErrorCategory": "batchflux.models",
    "BatchfluxError": "batchflux.errors",
    "ManifestError": "batchflux.errors",
    "ConfigError": "batchflux.errors",
    "ApiError": "batchflux.errors",
    "RunAborted": "batchflux.errors",
    "IntegrityError": "batchflux.errors",
    "OutputLockedError": "batchflux.errors",
    "Shard": "batchflux.shard",
    "merge_runs": "batchflux.merge",
    "export_dataset": "batchflux.dataset",
    "write_review": "batchflux.report",
    "build_report": "batchflux.report",
    "verify_run": "batchflux.verify",
    "VerifyReport": "batchflux.verify",
    "read_results": "batchflux.results",
}

__all__ = [
    "Api",
    "ApiError",
    "BatchfluxError",
    "ConfigError",
    "ErrorCategory",
    "ErrorInfo",
    "FileRecord",
    "IntegrityError",
    "JobSpec",
    "ManifestError",
    "OutputLockedError",
    "Result",
    "RunAborted",
    "RunConfig",
    "RunOptions",
    "RunResult",
    "Shard",
    "Simulator",
    "VerifyReport",
    "WorkItem",
    "__version__",
    "build_report",
    "count_items",
    "expand_job",
    "export_dataset",
    "load_job",
    "merge_runs",
    "read_results",
    "resolve_config",
    "run_batch",
    "run_batch_async",
    "verify_run",
    "write_review",
]

if TYPE_CHECKING:  # pragma: no cover
    from .batch import RunResult, run_batch, run_batch_async
    from .dataset import export_dataset
    from .errors import (
        ApiError,
        BatchfluxError,
        ConfigError,
        IntegrityError,
        ManifestError,
        OutputLockedError,
        RunAborted,
    )
    from .expand import count_items, expand_job
    from .manifest import load_job
    from .merge import merge_runs
    from .models import ErrorCategory, JobSpec, RunOptions, WorkItem
    from .report import build_report, write_review
    from .results import read_results
    from .shard import Shard
    from .verify import VerifyReport, verify_run


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchflux' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
