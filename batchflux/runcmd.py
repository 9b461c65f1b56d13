"""``batchflux run``: pick a reporter, handle SIGINT/SIGTERM, run, print the summary line."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

from .batch import RunResult, run_batch_async
from .errors import EXIT_SIGINT, EXIT_SIGTERM, ConfigError, RunAborted
from .models import RunOptions
from .report import JsonReporter, LogReporter, RichReporter, summary_line
from .runner import Runner
from .shard import parse_shard
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


def run_command(args: argparse.Namespace) -> int:
    api_key = _read_key_file(args.api_key_file) if args.api_key_file else None
    options = RunOptions(
        out_dir=args.out,
        concurrency=args.concurrency,
        max_inflight=args.max_inflight,
        rpm=args.rpm,
        retries=args.retries,
        budget=args.budget,
        max_items=args.max_items,
        job_timeout=args.job_timeout,
    )
    shard = parse_shard(args.shard) if args.shard else None
    reporter = _reporter(args, simulated=args.sim)
    runner_box: list[Runner] = []
    received: list[int] = []

    async def watch_signals(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if received:  # a second signal: stop waiting for anything
                    scope.cancel()
                    return
                received.append(signum)
                if runner_box:
                    runner_box[0].stop("interrupted")
                    runner_box[0].cancel()
                else:
                    scope.cancel()

    async def main() -> RunResult | BaseException | None:
        # Errors are returned, not raised, so that they leave the task group unwrapped
        # (a task group would wrap them in an ExceptionGroup).
        result: RunResult | BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals, tg.cancel_scope)
            try:
                result = await _run()
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the group
                result = exc
            tg.cancel_scope.cancel()
        return result

    async def _run() -> RunResult:
        return await run_batch_async(
                args.manifest,
                options=options,
                api_key=api_key,
                base_url=args.base_url,
                sim=args.sim,
                sim_job_seconds=args.sim_job_seconds,
                retry_failed=args.retry_failed,
                fresh=args.fresh,
                reporter=reporter,
                allow_insecure=args.insecure_http,
                wording=COMMAND_LINE,
                allowed_download_hosts=tuple(args.allow_download_host),
                on_runner=runner_box.append,
                on_message=reporter.message,
                shard=shard,
                dataset=args.dataset,
                max_failure_rate=args.max_failure_rate,
                verify=args.verify,
            )

    def interrupted_code() -> int:
        return EXIT_SIGTERM if received and received[0] == signal.SIGTERM else EXIT_SIGINT

    try:
        result = anyio.run(main)
        if isinstance(result, BaseException):
            raise result
    except RunAborted as exc:
        partial = getattr(exc, "result", None)
        print(f"batchflux: {exc}", file=sys.stderr)
        if partial is not None and partial.summary:
            print(summary_line(partial.summary, partial.out_dir, simulated=partial.simulated))
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
