"""The library entry point: :func:`run_batch` wires a manifest, a client, a store and a runner.

>>> from batchflux import run_batch
>>> result = run_batch("jobs/product-photos.yaml", sim=True, out_dir="out")   # doctest: +SKIP
>>> result.summary["counts"]["ok"], result.exit_code                          # doctest: +SKIP
(48, 0)

``sim=True`` runs against the built-in simulator in-process (no key, no network); otherwise
the key comes from ``api_key`` or ``APIFRAME_API_KEY`` and the base URL from ``base_url``,
``APIFRAME_BASE_URL`` or ``https://api.apiframe.ai``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx

from .apiframe import ApiframeClient, Timeouts
from .errors import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_TEMPFAIL,
    ApiError,
    ConfigError,
    RunAborted,
    UsageError,
)
from .expand import count_items, expand_job
from .manifest import JobSpec, load_job
from .models import DEFAULT_RUN_OPTIONS, ErrorCategory, RunOptions
from .retry import RetryPolicy
from .runner import Reporter, Runner, RunSettings, scan_items, workers_for
from .shard import Shard, filter_items
from .store import RunStore
from .wording import LIBRARY, Wording

DEFAULT_BASE_URL = "https://api.apiframe.ai"
SIM_BASE_URL = "http://simulator.batchflux.local"
SIM_API_KEY = "afk_batchflux_simulator"
#: The in-process simulator's default job time: short, so a first run is quick.
SIM_DEFAULT_JOB_SECONDS = 2.0

_UNAVAILABLE = (ErrorCategory.NETWORK, ErrorCategory.TIMEOUT, ErrorCategory.SERVER_ERROR,
                ErrorCategory.RATE_LIMITED)


@dataclass(frozen=True, slots=True)
class RunResult:
    """What :func:`run_batch` returns: the summary (as in summary.json) and the exit code the
    command line would use."""

    summary: dict[str, Any]
    out_dir: Path
    exit_code: int
    simulated: bool


def resolve_options(spec: JobSpec | None, override: RunOptions | None) -> RunOptions:
    options = DEFAULT_RUN_OPTIONS
    if spec is not None:
        options = options.merged(spec.options)
    if override is not None:
        options = options.merged(override)
    return options


def _fresh_directory(out_dir: Path) -> Path | None:
    """Move an existing run directory aside (never delete it). Returns where it went."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = out_dir.with_name(f"{out_dir.name}.{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out_dir.with_name(f"{out_dir.name}.{stamp}-{n}")
    out_dir.rename(target)
    return target


def _sim_transport(sim: Any, job_seconds: float | None) -> httpx.AsyncBaseTransport:
    from .sim import SimSettings, create_app

    settings = sim if isinstance(sim, SimSettings) else SimSettings(
        job_seconds=SIM_DEFAULT_JOB_SECONDS, queue_seconds=0.2)
    if job_seconds is not None:
        settings = replace(settings, job_seconds=job_seconds,
                           queue_seconds=min(0.2, job_seconds / 4))
    return httpx.ASGITransport(app=create_app(settings))


async def _preflight(client: ApiframeClient, options: RunOptions, *,
                     price_given: bool) -> tuple[float, int | None]:
    """Check the key and learn the price before any money moves.

    Returns ``(cost per image, team credits or None)``. A provider that cannot be reached
    gives exit 75; a refused key exit 78.
    """
    try:
        me = await client.me()
        cost = options.cost_per_image or 0.0
        if not price_given:
            for model in await client.models():
                if model.get("id") == "flux-2-dev" and isinstance(
                        model.get("costMax"), (int, float)):
                    cost = float(model["costMax"])
    except ApiError as exc:
        if exc.category is ErrorCategory.AUTH:
            raise ConfigError(f"the API refused the key: {exc.message}") from exc
        if exc.category in _UNAVAILABLE:
            raise RunAborted(f"the API is not available right now: {exc.message}",
                             exit_code=EXIT_TEMPFAIL) from exc
        raise
    team = me.get("team") if isinstance(me, dict) else None
    credits = team.get("credits") if isinstance(team, dict) else None
    return cost, credits if isinstance(credits, int) else None


async def run_batch_async(
    manifest: str | os.PathLike[str] | JobSpec,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    options: RunOptions | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    sim: Any = False,
    sim_job_seconds: float | None = None,
    retry_failed: str | None = None,
    fresh: bool = False,
    reporter: Reporter | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    allow_insecure: bool = False,
    wording: Wording = LIBRARY,
    allowed_download_hosts: tuple[str, ...] = (),
    timeouts: Timeouts | None = None,
    on_runner: Callable[[Runner], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    shard: Shard | None = None,
    dataset: str | None = None,
    max_failure_rate: float | None = None,
    verify: str = "auto",
) -> RunResult:
    """Run every item of ``manifest`` and return the summary. See :func:`run_batch`."""
    override = options or RunOptions()
    # The manifest's own size guard is checked while loading; a --max-items given here
    # replaces it, and is checked below against the exact count.
    spec = manifest if isinstance(manifest, JobSpec) else load_job(
        manifest, max_items=None if override.max_items is None else sys.maxsize)
    if out_dir is not None:
        override = replace(override, out_dir=str(out_dir))
    resolved = resolve_options(spec, override)
    price_given = override.cost_per_image is not None or spec.options.cost_per_image is not None
    if retry_failed not in (None, "retryable", "all"):
        raise UsageError("--retry-failed takes 'retryable' or 'all'")
    if verify not in ("auto", "decode", "structure"):
        raise UsageError("--verify takes 'auto', 'decode' or 'structure'")

    total = count_items(spec)
    if dataset is not None and dataset not in DATASET_FORMATS:
        raise UsageError(f"--dataset takes one of {', '.join(DATASET_FORMATS)}")
    if resolved.max_items is not None and total > resolved.max_items:
        raise UsageError(f"{spec.path} expands to {total} items, over the limit of "
                         f"{resolved.max_items} (raise it with --max-items)")

    simulated = bool(sim)
    if simulated:
        transport = _sim_transport(sim, sim_job_seconds)
        api_key, base_url = SIM_API_KEY, SIM_BASE_URL
    else:
        api_key = api_key or os.environ.get("APIFRAME_API_KEY")
        if not api_key:
            raise ConfigError(
                "no API key: set APIFRAME_API_KEY (or pass --api-key-file FILE), "
                "or add --sim to run against the built-in simulator")
        base_url = base_url or os.environ.get("APIFRAME_BASE_URL") or DEFAULT_BASE_URL

    out = Path(resolved.out_dir or "out")
    if fresh:
        moved = _fresh_directory(out)
        if moved is not None and on_message is not None:
            on_message(f"--fresh: the previous run directory was moved to {moved}")

    # -j is jobs in flight; --max-inflight, when given, is an expert's ceiling over it.
    max_inflight = max(1, resolved.max_inflight or resolved.concurrency
                       or DEFAULT_RUN_OPTIONS.concurrency or 1)
    probe = RunSettings(max_inflight=max_inflight)
    client = ApiframeClient(
        api_key=api_key, base_url=base_url, transport=transport,
        max_connections=workers_for(probe) + 4,
        allow_insecure=allow_insecure, allowed_download_hosts=allowed_download_hosts,
        wording=wording,
        timeouts=timeouts or Timeouts(),
    )
    async with client:
        cost, credits = await _preflight(client, resolved, price_given=price_given)
        store = RunStore(out, filename_template=resolved.filename_template
                         or DEFAULT_RUN_OPTIONS.filename_template or "{key}.{ext}")
        index = store.open()
        try:
            # One pass over the items (lazy, 8 bytes an item to run): the exact total (of
            # this shard), what is still to run, and which items repeat another's request.
            scan = scan_items(filter_items(expand_job(spec), shard), index,
                              retry_failed=retry_failed)
            total = scan.total
            remaining = scan.to_run
            if resolved.budget is not None and remaining * cost > resolved.budget:
                raise RunAborted(
                    f"the plan needs about {remaining * cost:g} credits for {remaining} items "
                    f"({cost:g} each), over the budget of {resolved.budget:g}; raise --budget "
                    f"or lower --max-items", exit_code=EXIT_ITEMS_FAILED)
            if credits is not None and on_message is not None and remaining * cost > credits:
                on_message(f"warning: the team has {credits} credits, the remaining items "
                           f"need about {remaining * cost:g}: the run will stop when they "
                           "run out")
            store.freeze_manifest(spec.path)
            settings = RunSettings(
                max_inflight=max_inflight,
                submits_per_second=(resolved.rpm / 60.0) if resolved.rpm else None,
                retries=resolved.retries if resolved.retries is not None else 4,
                request_retry=RetryPolicy(
                    max_attempts=max(1, (resolved.retries or 0) + 1) + 2),
                job_timeout=resolved.job_timeout or 600.0,
                budget=resolved.budget,
                cost_per_image=cost,
                retry_failed=retry_failed,
                expected_job_seconds=(sim_job_seconds or SIM_DEFAULT_JOB_SECONDS)
                if simulated else None,
                verify=verify,
            )
            runner = Runner(client=client, store=store, index=index, settings=settings,
                            reporter=reporter)
            if on_runner is not None:
                on_runner(runner)
            # Which manifest (by content) and which shard produced this run directory: the
            # facts `batchflux merge` checks before combining run directories.
            extra = {"manifest_sha256": _file_sha256(spec.path),
                     "shard": shard.label if shard is not None else None}
            try:
                summary = await runner.run(filter_items(expand_job(spec), shard), total=total,
                                           duplicates=scan.duplicates, summary_extra=extra)
            except RunAborted as exc:
                summary = getattr(exc, "summary", {})
                exc.result = RunResult(summary, out, exc.exit_code, simulated)  # type: ignore[attr-defined]
                raise
            if dataset is not None:
                from .dataset import export_dataset

                exported = export_dataset(out, dataset)
                if on_message is not None:
                    on_message(f"dataset ({dataset}): {exported.rows} rows in {exported.path}")
        finally:
            store.close()
    return RunResult(summary, out, exit_code_for(summary, max_failure_rate), simulated)


DATASET_FORMATS = ("hf", "webdataset")


def exit_code_for(summary: dict[str, Any], max_failure_rate: float | None = None) -> int:
    """0 when every item of the run directory (as far as the manifest's items go: this run's
    and earlier runs') is ok, or when at most ``max_failure_rate`` of them failed (a cron job
    that expects a few failures); 1 otherwise, and always 1 when the run stopped early
    (budget, credits, key) or left items to do."""
    counts = summary.get("counts", {})
    totals = summary.get("totals") or {}
    failed = totals.get("failed", counts.get("failed", 0))
    ok = totals.get("ok", counts.get("ok", 0))
    if summary.get("stop_reason") or (totals.get("to_do") or 0) > 0:
        return EXIT_ITEMS_FAILED
    if failed == 0:
        return EXIT_OK
    if max_failure_rate is not None and failed / (ok + failed) <= max_failure_rate:
        return EXIT_OK
    return EXIT_ITEMS_FAILED


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def run_batch(manifest: str | os.PathLike[str] | JobSpec, **kwargs: Any) -> RunResult:
    """Run a manifest to completion (resuming what an earlier run left) and return the result.

    Keyword arguments are those of :func:`run_batch_async`: ``out_dir``, ``options``
    (a :class:`~batchflux.models.RunOptions` overriding the manifest's ``run:`` block),
    ``api_key``, ``base_url``, ``sim`` (True, or a ``SimSettings``), ``retry_failed``
    (``"retryable"`` or ``"all"``), ``fresh``, ``reporter``.
    """
    return anyio.run(lambda: run_batch_async(manifest, **kwargs))


__all__ = ["RunResult", "run_batch", "run_batch_async"]
