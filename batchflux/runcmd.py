"""``batchflux run``: the command line's composition root for a run.

It is the one place that reads the environment (``APIFRAME_API_KEY``, ``APIFRAME_BASE_URL``)
and the key file, builds the :class:`~batchflux.config.Target` and the
:class:`~batchflux.models.RunOptions` from the flags, picks a reporter, turns SIGINT/SIGTERM
into the run's stop signal, and prints the summary line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

from .apiframe import DEFAULT_BASE_URL
from .batch import RunResult, run_batch_async
from .config import Api, Simulator, Target
from .errors import EXIT_SIGINT, EXIT_SIGTERM, ConfigError, RunAborted
from .models import RunOptions
from .progress import JsonReporter, LogReporter, RichReporter, summary_line
from .wording import COMMAND_LINE

SIM_BANNER = ("SIMULATED: images come from batchflux's built-in Apiframe simulator, not from "
              "flux-2-dev. Nothing is paid. Set APIFRAME_API_KEY and drop --sim for real images.")


def _read_key_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from exc
    key = text.strip()
    if not key:
        raise ConfigError(f"the API key file {path} is empty")
    return key


def _reporter(args: argparse.Namespace, *, simulated: bool) -> Any:
    banner = SIM_BANNER if simulated else None
    if args.log_format == "json":
        return JsonReporter(simulated=simulated)
    if args.quiet:
        return LogReporter(interval=None)
    if sys.stderr.isatty():
        return RichReporter(banner=banner)
    if getattr(args, "progress", False):
        return LogReporter(interval=10.0, banner=banner)
    # Cron, CI and pipes: quiet unless asked (the summary line still ends the run), but a
    # simulated run says so up front.
    return LogReporter(interval=None, banner=banner)


def _target(args: argparse.Namespace) -> Target:
    """Where requests go: ``--sim``, else the API with the key from ``--api-key-file`` or
    ``APIFRAME_API_KEY`` and the base URL from ``--base-url`` or ``APIFRAME_BASE_URL``."""
    if args.sim:
        return Simulator(job_seconds=args.sim_job_seconds, credits=args.sim_credits)
    api_key = _read_key_file(args.api_key_file) if args.api_key_file else \
        os.environ.get("APIFRAME_API_KEY")
    if not api_key:
        raise ConfigError(
            "no API key: set APIFRAME_API_KEY (or pass --api-key-file FILE), "
            "or add --sim to run against the built-in simulator")
    return Api(api_key=api_key,
               base_url=args.base_url or os.environ.get("APIFRAME_BASE_URL")
               or DEFAULT_BASE_URL,
               allow_insecure=args.insecure_http,
               allowed_download_hosts=tuple(args.allow_download_host))


def _options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        out_dir=args.out, concurrency=args.concurrency, max_inflight=args.max_inflight,
        rpm=args.rpm, retries=args.retries, budget=args.budget, max_items=args.max_items,
        job_timeout=args.job_timeout, retry_failed=args.retry_failed,
        fresh=args.fresh or None, verify=args.verify, max_failure_rate=args.max_failure_rate,
        dataset=args.dataset, shard=args.shard, limit=args.limit,
        fill_budget=args.fill_budget, reroll=args.reroll, webhook_url=args.webhook_url,
        webhook_listen=args.webhook_listen)


class _Watched:
    """A reporter that also notes when the run itself started (after its checks)."""

    def __init__(self, reporter: Any) -> None:
        self._reporter = reporter
        self.started = False

    def start(self, *, total: int | None, skipped: int, attached: int) -> None:
        self.started = True
        self._reporter.start(total=total, skipped=skipped, attached=attached)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reporter, name)


def run_command(args: argparse.Namespace) -> int:
    """``batchflux run``: the composition of options, target, reporter and signals."""
    options = _options(args)
    target = _target(args)
    reporter = _Watched(_reporter(args, simulated=args.sim))
    stop = anyio.Event()
    received: list[int] = []

    async def watch_signals(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if received or not reporter.started:
                    # A second signal, or one before the run started: stop waiting at once.
                    received.append(signum)
                    scope.cancel()
                    return
                received.append(signum)
                stop.set()  # stop submitting; in-flight jobs stay journaled

    async def main() -> RunResult | BaseException | None:
        # Errors are returned, not raised, so that they leave the task group unwrapped
        # (a task group would wrap them in an ExceptionGroup).
        result: RunResult | BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals, tg.cancel_scope)
            try:
                result = await run_batch_async(args.manifest, options, target=target,
                                               reporter=reporter, stop=stop,
                                               wording=COMMAND_LINE)
            except Exception as exc:
                result = exc
            tg.cancel_scope.cancel()
        return result

    def interrupted_code() -> int:
        return EXIT_SIGTERM if received and received[0] == signal.SIGTERM else EXIT_SIGINT

    try:
        result = anyio.run(main)
        if isinstance(result, BaseException):
            raise result
    except RunAborted as exc:
        print(f"batchflux: {exc}", file=sys.stderr)
        if exc.summary and exc.out_dir is not None:
            print(summary_line(exc.summary, exc.out_dir, simulated=exc.simulated))
        return exc.exit_code
    if result is None:  # cancelled before the run started
        print("batchflux: interrupted before the run started", file=sys.stderr)
        return interrupted_code()
    print(summary_line(result.summary, result.out_dir, simulated=result.simulated))
    if received:
        print("batchflux: interrupted; in-flight jobs are journaled, run the same command "
              "again to finish", file=sys.stderr)
        return interrupted_code()
    return result.exit_code


__all__ = ["run_command"]
