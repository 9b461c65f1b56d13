"""The library entry point: :func:`run_batch` runs a manifest against a target.

>>> from batchflux import RunOptions, Simulator, run_batch
>>> result = run_batch("jobs/nightly.yaml", RunOptions(out_dir="out/nightly"),
...                    target=Simulator())
>>> result.exit_code, result.summary["totals"]["ok"]
(0, 12)

Five parameters: the manifest, the options (a :class:`~batchflux.models.RunOptions` over the
manifest's ``run:`` block: :func:`batchflux.config.resolve_config` merges and checks them
before anything is spent), the target (:class:`~batchflux.config.Simulator` or
:class:`~batchflux.config.Api`), a reporter (how the run tells how it goes), and a stop
signal (an ``anyio.Event``: set it and the run stops as on Ctrl-C, in-flight jobs journaled).
The library reads no environment variable: the command line does that.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from .apiframe import ApiframeClient
from .completion import CompletionSource, WebhookCompletion, WebhookMailbox
from .config import (
    Api,
    RunConfig,
    Simulator,
    Target,
    WebhookConfig,
    explicit_price,
    resolve_config,
)
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
from .fileutil import sha256_file
from .lifecycle import Lifecycle
from .manifest import load_job
from .models import ErrorCategory, JobSpec, RunOptions, WorkItem
from .resume import Scan, scan_items, skip_reason
from .retry import RetryPolicy
from .runner import Reporter, Runner, RunSettings, workers_for
from .shard import filter_items
from .store import ResumeIndex, RunStore
from .webhooks import WebhookReceiver, bind_listener, probe, signing_secret
from .wording import LIBRARY, Wording

__all__ = ["RunResult", "exit_code_for", "run_batch", "run_batch_async"]

SIM_BASE_URL = "http://simulator.batchflux.local"
SIM_API_KEY = "afk_batchflux_simulator"
#: The in-process simulator's default job time: short, so a first run is quick.
SIM_DEFAULT_JOB_SECONDS = 2.0
#: The in-process simulator's default balance: a trial is never stopped by it.
SIM_DEFAULT_CREDITS = 10**9

_UNAVAILABLE = (ErrorCategory.NETWORK, ErrorCategory.TIMEOUT, ErrorCategory.SERVER_ERROR,
                ErrorCategory.RATE_LIMITED)


@dataclass(frozen=True, slots=True)
class _Webhooks:
    """Webhook mode for one run: its settings, the bound socket, the signing secret (the
    digest of the key, never the key), and the in-process simulator's app when the target is
    :class:`~batchflux.config.Simulator` (its lifespan delivers the webhooks)."""

    config: WebhookConfig
    listener: socket.socket
    secret: bytes
    sim_app: Any = None


@dataclass(frozen=True, slots=True)
class RunResult:
    """What :func:`run_batch` returns: the summary (as in summary.json), the output directory,
    the exit code the command line would use, and whether it ran on the simulator.

    >>> from batchflux import RunOptions, Simulator, run_batch
    >>> result = run_batch("jobs/nightly.yaml", RunOptions(out_dir="out/nightly"),
    ...                    target=Simulator())
    >>> result.exit_code, result.simulated, result.summary["counts"]["skipped"]  # done before
    (0, True, 12)
    """

    summary: dict[str, Any]
    out_dir: Path
    exit_code: int
    simulated: bool


async def run_batch_async(
    manifest: str | os.PathLike[str] | JobSpec,
    options: RunOptions | None = None,
    *,
    target: Target,
    reporter: Reporter | None = None,
    stop: anyio.Event | None = None,
    wording: Wording = LIBRARY,
) -> RunResult:
    """:func:`run_batch` for code that already runs an event loop.

    >>> import anyio
    >>> from batchflux import RunOptions, Simulator, run_batch_async
    >>> async def nightly():
    ...     return await run_batch_async("jobs/nightly.yaml", RunOptions(out_dir="out/nightly"),
    ...                                  target=Simulator())
    >>> anyio.run(nightly).summary["counts"]["skipped"]    # done by run_batch's example
    12
    """
    override = options or RunOptions()
    # The manifest's own size guard is checked while loading; a max_items given here replaces
    # it, and is checked below against the exact count.
    spec = manifest if isinstance(manifest, JobSpec) else load_job(
        manifest, max_items=None if override.max_items is None else sys.maxsize)
    config = resolve_config(spec, override, wording=wording)
    total = count_items(spec)
    if total > config.max_items:
        raise UsageError(f"{spec.path} expands to {total} items, over the limit of "
                         f"{config.max_items} (raise it with {wording.setting('max_items')})")
    with contextlib.ExitStack() as held:
        listener = None
        if config.webhook is not None:
            # Bound before anything is spent or created: a taken port refuses the run (78).
            listener = held.enter_context(contextlib.closing(bind_listener(
                config.webhook.host, config.webhook.port,
                setting=wording.setting("webhook_listen"))))
        connection = _Connection(target, config, wording)
        webhooks = None
        if config.webhook is not None and listener is not None:
            webhooks = _Webhooks(config.webhook, listener, connection.secret)
        return await _run_batch(spec, options, config, connection, webhooks=webhooks,
                                reporter=reporter, stop=stop, wording=wording)


async def _run_batch(spec: JobSpec, options: RunOptions | None, config: RunConfig,
                     connection: _Connection, *, webhooks: _Webhooks | None,
                     reporter: Reporter | None, stop: anyio.Event | None,
                     wording: Wording) -> RunResult:
    """Preflight, plan, run and export: what :func:`run_batch_async` does once the settings
    are checked (and webhook mode's port is held)."""
    say = reporter.message if reporter is not None else (lambda text: None)
    if config.fresh:
        moved = _move_aside(config.out_dir)
        if moved is not None:
            say(f"the previous run directory was moved to {moved}")
    async with connection.open() as client:
        cost, credits = await _preflight(client, config,
                                         price_given=explicit_price(spec, options))
    config = _fill_budget(config, cost)
    if not config.out_dir.exists():
        # Nothing to resume: check the plan before anything is created, so that a refused
        # run leaves nothing behind.
        _check_plan(spec, config, ResumeIndex(), cost=cost, credits=credits, wording=wording,
                    say=say)
    store = RunStore(config.out_dir, filename_template=config.filename_template)
    index = store.open()
    try:
        scan = _check_plan(spec, config, index, cost=cost, credits=credits, wording=wording,
                           say=None)
        # The built-in simulator keeps its world in the run directory, so that a resumed
        # --sim run finds its jobs, keys and uploads as it would at the real API.
        async with connection.open(state_dir=store.state_dir / "sim") as client:
            if webhooks is not None:
                webhooks = replace(webhooks, sim_app=connection.app)
            summary = await _run(spec, config, store, index, client, scan=scan, cost=cost,
                                 expected=connection.expected, reporter=reporter, stop=stop,
                                 simulated=connection.simulated, say=say, webhooks=webhooks)
    finally:
        store.close()
    return RunResult(summary, config.out_dir,
                     exit_code_for(summary, config.max_failure_rate,
                                   limited=config.limit is not None), connection.simulated)


def _fill_budget(config: RunConfig, cost: float) -> RunConfig:
    """``fill_budget``: run the first items still to do that the budget pays for (a limit)."""
    if not config.fill_budget or config.budget is None or cost <= 0:
        return config
    affordable = int(config.budget // cost)
    limit = affordable if config.limit is None else min(config.limit, affordable)
    return replace(config, limit=max(limit, 0))


def _check_plan(spec: JobSpec, config: RunConfig, index: ResumeIndex, *, cost: float,
                credits: int | None, wording: Wording, say: Any) -> Scan:
    """One pass over the items (lazy, 8 bytes an item to run): the exact total (of this
    shard), what is still to run, and which items repeat another's request; refuse a plan
    over the budget, with advice that works when followed; warn when the balance is short."""
    scan = scan_items(_all_items(spec, config), index, retry_failed=config.retry_failed,
                      keys=True)
    if config.limit is not None and scan.to_run > config.limit:
        scan = replace(scan, to_run=config.limit)
    remaining = scan.to_run
    if config.budget is not None and remaining * cost > config.budget:
        raise RunAborted(_over_budget(remaining, cost, config.budget, wording),
                         exit_code=EXIT_ITEMS_FAILED)
    if say is not None and credits is not None and remaining * cost > credits:
        say(f"warning: the team has {credits} credits, the remaining items need about "
            f"{remaining * cost:g}: the run will stop when they run out")
    return scan


def _over_budget(remaining: int, cost: float, budget: float, wording: Wording) -> str:
    """Why a plan is refused, and three ways on (each tested by following it)."""
    needed = remaining * cost
    affordable = int(budget // cost) if cost > 0 else remaining
    advice = [f"raise the budget ({wording.setting_to('budget', f'{needed:g}')})"]
    if affordable > 0:
        advice += [(f"run the first {affordable} of them now "
                    f"({wording.setting_to('limit', affordable)})"),
                   ("or spend up to the budget and stop "
                    f"({wording.setting_to('fill_budget', True)})")]
    else:
        advice[0] = "or " + advice[0] + f": it does not pay for one item ({cost:g} credits)"
    return (f"the plan needs about {needed:g} credits for {remaining} items ({cost:g} each), "
            f"over the budget of {budget:g}: " + ", ".join(advice))


async def _run(spec: JobSpec, config: RunConfig, store: RunStore, index: ResumeIndex,
               client: ApiframeClient, *, scan: Scan, cost: float, expected: float | None,
               reporter: Reporter | None, stop: anyio.Event | None, simulated: bool,
               say: Callable[[str], None], webhooks: _Webhooks | None) -> dict[str, Any]:
    """Run the plan, and export it."""
    store.freeze_manifest(spec.path)
    store.write_item_keys(scan.keys)
    settings = _settings(config, cost=cost, expected=expected)
    mailbox = WebhookMailbox() if webhooks is not None else None
    completion = None
    if webhooks is not None and mailbox is not None:
        completion = _webhook_completion(mailbox, webhooks.config, settings, say)
    runner = Runner(client=client, store=store, index=index, settings=settings,
                    reporter=reporter, completion=completion)
    # Which manifest (by content) and which shard produced this run directory: the facts
    # `batchflux merge` checks before combining run directories.
    extra = {"manifest_sha256": _digest(spec.path),
             "shard": config.shard.label if config.shard is not None else None}
    items = _items(spec, config, index)
    try:
        if webhooks is None or mailbox is None:
            summary = await runner.run(items, total=scan.total, duplicates=scan.duplicates,
                                       summary_extra=extra, stop=stop)
        else:
            summary = await _run_receiving(
                webhooks, mailbox, say,
                lambda: runner.run(items, total=scan.total, duplicates=scan.duplicates,
                                   summary_extra=extra, stop=stop))
    except RunAborted as exc:
        exc.out_dir, exc.simulated = config.out_dir, simulated
        raise
    if config.dataset is not None:
        from .dataset import export_dataset

        exported = export_dataset(config.out_dir, config.dataset)
        say(f"dataset ({config.dataset}): {exported.rows} rows in {exported.path}")
    return summary


def _webhook_completion(mailbox: WebhookMailbox, webhook: WebhookConfig, settings: RunSettings,
                        say: Callable[[str], None]) -> Callable[[Lifecycle], CompletionSource]:
    """The completion source of webhook mode, built with the run's lifecycle."""

    def build(lifecycle: Lifecycle) -> CompletionSource:
        return WebhookCompletion(mailbox=mailbox, fetch=lifecycle.fetch_job,
                                 timings=lifecycle.timings, policy=settings.poll,
                                 expected=settings.expected_job_seconds, url=webhook.url,
                                 say=say, clock=lifecycle.clock, sleep=lifecycle.sleep)

    return build


async def _run_receiving(webhooks: _Webhooks, mailbox: WebhookMailbox,
                         say: Callable[[str], None],
                         run: Callable[[], Any]) -> dict[str, Any]:
    """``run()`` (the pool) with the webhook receiver serving beside it in one task group:
    started and checked before the first submit, stopped once the run is over. With the
    in-process simulator, its webhook sender runs here too (its app's lifespan)."""
    config = webhooks.config
    receiver = WebhookReceiver(mailbox=mailbox, secret=webhooks.secret, path=config.path)
    result: dict[str, Any] | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        await tg.start(receiver.serve, webhooks.listener)
        if webhooks.sim_app is not None:
            await tg.start(_sim_deliveries, webhooks.sim_app)
        try:
            await probe(config.host, config.port, config.path)
            say(f"webhooks: receiving on {config.listen} (POST {config.path}); Apiframe must "
                f"reach {config.url}, which batchflux cannot check from here. Jobs whose "
                "webhook does not come are found by a sparse poll")
            result = await run()
        except Exception as exc:
            error = exc
        await receiver.stop()
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    assert result is not None
    return result


async def _sim_deliveries(app: Any, *, task_status: TaskStatus[None]) -> None:
    """The in-process simulator's lifespan (its webhook sender), until cancelled."""
    async with app.router.lifespan_context(app):
        task_status.started()
        await anyio.sleep_forever()


def _all_items(spec: JobSpec, config: RunConfig) -> Iterator[WorkItem]:
    """The run's items, lazily: the manifest's (its shard's), then with ``reroll`` the
    rerolls of its rejected images (:mod:`batchflux.reroll`)."""
    yield from filter_items(expand_job(spec), config.shard)
    if config.reroll is not None:
        from .reroll import reroll_items

        yield from filter_items(
            reroll_items(expand_job(spec), config.out_dir, image_hashes=spec.image_hashes,
                         first_index=count_items(spec)), config.shard)


def _items(spec: JobSpec, config: RunConfig, index: ResumeIndex) -> Iterator[WorkItem]:
    """The run's items (:func:`_all_items`), and with ``limit``, up to the first ``limit``
    items still to do (the items after them are not reached)."""
    items: Iterable[WorkItem] = _all_items(spec, config)
    if config.limit is None:
        yield from items
        return
    to_do = 0
    for item in items:
        if skip_reason(index, item.key, config.retry_failed) is None:
            if to_do == config.limit:
                return
            to_do += 1
        yield item


def _settings(config: RunConfig, *, cost: float, expected: float | None) -> RunSettings:
    return RunSettings(
        max_inflight=config.inflight_ceiling,
        sharers=config.shard.count if config.shard is not None else 1,
        submits_per_second=config.rpm / 60.0 if config.rpm else None,
        retries=config.retries,
        request_retry=RetryPolicy(max_attempts=config.retries + 3),
        job_timeout=config.job_timeout,
        budget=config.budget,
        cost_per_image=cost,
        retry_failed=config.retry_failed,
        expected_job_seconds=expected,
        verify=config.verify,
        webhook=config.webhook.request if config.webhook is not None else None,
    )


class _Connection:
    """How to reach ``target``: an API client for the preflight, then one for the run (for
    the built-in simulator, the run's keeps its world in ``state_dir``)."""

    def __init__(self, target: Target, config: RunConfig, wording: Wording) -> None:
        if not isinstance(target, (Simulator, Api)):
            raise UsageError(f"target must be Simulator() or Api(...), got {target!r}")
        self.target, self.wording = target, wording
        self.connections = workers_for(RunSettings(max_inflight=config.inflight_ceiling)) + 4
        self.simulated = isinstance(target, Simulator)
        #: The webhook signing secret: the digest of the key, never the key.
        self.secret = signing_secret(target.api_key if isinstance(target, Api) else SIM_API_KEY)
        #: The built-in simulator's app while :meth:`open` holds it (its lifespan delivers
        #: webhooks), else None.
        self.app: Any = None
        self.expected = (target.job_seconds or SIM_DEFAULT_JOB_SECONDS) \
            if isinstance(target, Simulator) else None
        # Checked now, before anything is spent: a key the client refuses, a bad URL.
        if isinstance(target, Api):
            self._api_client()

    @contextlib.asynccontextmanager
    async def open(self, *, state_dir: Path | None = None) -> AsyncIterator[ApiframeClient]:
        """A client for the target, closed (and the simulator's directory released) after."""
        target = self.target
        if isinstance(target, Api):
            async with self._api_client() as client:
                yield client
            return
        assert isinstance(target, Simulator)
        from .sim import SimSettings, SimStateError, create_app

        settings = target.settings or SimSettings(job_seconds=SIM_DEFAULT_JOB_SECONDS,
                                                  queue_seconds=0.2,
                                                  credits=SIM_DEFAULT_CREDITS)
        if target.job_seconds is not None:
            settings = replace(settings, job_seconds=target.job_seconds,
                               queue_seconds=min(0.2, target.job_seconds / 4))
        if target.credits is not None:
            settings = replace(settings, credits=target.credits)
        try:
            app = create_app(settings, state_dir=state_dir)
        except SimStateError as exc:
            raise ConfigError(f"the simulator state in {state_dir} cannot be used: {exc}") \
                from exc
        self.app = app
        try:
            async with ApiframeClient(api_key=SIM_API_KEY, base_url=SIM_BASE_URL,
                                      transport=httpx.ASGITransport(app=app),
                                      max_connections=self.connections,
                                      wording=self.wording) as client:
                yield client
        finally:
            self.app = None
            app.close()

    def _api_client(self) -> ApiframeClient:
        target = self.target
        assert isinstance(target, Api)
        return ApiframeClient(
            api_key=target.api_key, base_url=target.base_url, transport=target.transport,
            max_connections=self.connections, allow_insecure=target.allow_insecure,
            allowed_download_hosts=target.allowed_download_hosts, wording=self.wording,
            timeouts=target.timeouts)


async def _preflight(client: ApiframeClient, config: RunConfig, *,
                     price_given: bool) -> tuple[float, int | None]:
    """Check the key and learn the price before any money moves.

    Returns ``(cost per image, team credits or None)``. A provider that cannot be reached
    gives exit 75; a refused key exit 78.
    """
    try:
        me = await client.me()
        cost = config.cost_per_image or 0.0
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


def _move_aside(out_dir: Path) -> Path | None:
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


def exit_code_for(summary: dict[str, Any], max_failure_rate: float | None = None, *,
                  limited: bool = False) -> int:
    """0 when every item of the run directory (as far as the manifest's items go: this run's
    and earlier runs') is ok, or when at most ``max_failure_rate`` of them failed (a cron job
    that expects a few failures); 1 otherwise, and always 1 when the run stopped early
    (budget, credits, key) or left items to do (unless ``limited``: it was asked to)."""
    counts = summary.get("counts", {})
    totals = summary.get("totals") or {}
    failed = totals.get("failed", counts.get("failed", 0))
    ok = totals.get("ok", counts.get("ok", 0))
    if summary.get("stop_reason") or ((totals.get("to_do") or 0) > 0 and not limited):
        return EXIT_ITEMS_FAILED
    if failed == 0:
        return EXIT_OK
    if max_failure_rate is not None and failed / (ok + failed) <= max_failure_rate:
        return EXIT_OK
    return EXIT_ITEMS_FAILED


def _digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def run_batch(manifest: str | os.PathLike[str] | JobSpec, options: RunOptions | None = None,
              *, target: Target, reporter: Reporter | None = None,
              stop: anyio.Event | None = None, wording: Wording = LIBRARY) -> RunResult:
    """Run every item of ``manifest`` that is not done yet and return the result.

    ``options`` override the manifest's ``run:`` block (``RunOptions(out_dir="out/x",
    concurrency=16, budget=100, retry_failed="retryable", ...)``); ``target`` is
    ``Simulator()`` or ``Api(api_key, base_url=...)``; ``reporter`` receives progress
    (:class:`batchflux.runner.Reporter`; default: silence); ``stop``, when set from the
    event loop, stops the run as Ctrl-C does. Raises
    :class:`~batchflux.errors.ManifestError`, :class:`~batchflux.errors.UsageError` or
    :class:`~batchflux.errors.ConfigError` before anything is spent, and
    :class:`~batchflux.errors.RunAborted` (with ``.summary``) when a run-fatal condition
    stopped the run; failed items are data in the result, not exceptions.

    >>> from batchflux import RunOptions, Simulator, run_batch
    >>> result = run_batch("jobs/nightly.yaml", RunOptions(out_dir="out/nightly"),
    ...                    target=Simulator())
    >>> result.exit_code, result.summary["totals"]["ok"], result.out_dir.as_posix()
    (0, 12, 'out/nightly')
    """
    return anyio.run(lambda: run_batch_async(manifest, options, target=target,
                                             reporter=reporter, stop=stop, wording=wording))
