"""Serve the simulator on a real port with uvicorn: ``batchflux sim serve`` and
``serve_in_thread`` for tests and benchmarks."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from .app import create_app
from .faults import DropLogFilter
from .persist import SimStateError
from .settings import SimSettings, parse_spread


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``batchflux sim serve``."""
    d = SimSettings()
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    a("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    a("--job-seconds", type=parse_spread, default=d.job_seconds, metavar="S|A-B",
      help="mean job duration, or A-B for a uniform spread (default: %(default)s)")
    a("--queue-seconds", type=parse_spread, default=d.queue_seconds, metavar="S|A-B",
      help="time a job stays QUEUED (default: %(default)s)")
    a("--rps", type=float, default=None, help="submits per second per key (token bucket)")
    a("--burst", type=int, default=None, help="token bucket size (default: ceil(rps))")
    a("--max-inflight", type=int, default=None, metavar="N",
      help="unfinished jobs allowed per key; more are answered 429")
    a("--error-rate", type=float, default=0.0, metavar="P", help="500/503 probability")
    a("--drop-rate", type=float, default=0.0, metavar="P", help="dropped-connection probability")
    a("--fail-rate", type=float, default=0.0, metavar="P", help="FAILED-job probability")
    a("--fail-capacity-share", type=float, default=d.fail_capacity_share, metavar="P",
      help="share of failures that are 'No available capacity' (default: %(default)s)")
    a("--truncate-rate", type=float, default=0.0, metavar="P",
      help="probability that an image download is cut short")
    a("--corrupt-rate", type=float, default=0.0, metavar="P",
      help="probability that an image download does not decode")
    a("--download-bps", type=float, default=None, metavar="BYTES",
      help="throttle image downloads to this many bytes per second")
    a("--stall-rate", type=float, default=0.0, metavar="P",
      help="probability that a submit/poll answer is held back --stall-seconds")
    a("--stall-seconds", type=float, default=d.stall_seconds, metavar="S",
      help="how long a stalled answer waits (default: %(default)s)")
    a("--storm-seconds", type=float, default=d.storm_seconds, metavar="S",
      help="a 429 storm: every submit this long after the first is refused")
    a("--storm-retry-after", type=int, default=d.storm_retry_after, metavar="S",
      help="Retry-After sent during a storm (default: %(default)s)")
    a("--webhook-drop-rate", type=float, default=0.0, metavar="P",
      help="probability that a webhook event is lost on the way (never arrives)")
    a("--webhook-dup-rate", type=float, default=0.0, metavar="P",
      help="probability that a webhook event arrives twice")
    a("--webhook-delay", type=parse_spread, default=d.webhook_delay, metavar="S|A-B",
      help="seconds each webhook event waits before it is sent: a mean (spread 0.5-1.5x), "
      "or A-B for a uniform spread (default: %(default)s)")
    a("--credits", type=int, default=d.credits, help="starting team credits (default: %(default)s)")
    a("--cost-per-image", type=int, default=d.cost_per_image,
      help="credits per image (default: %(default)s)")
    a("--asset-ttl", type=float, default=d.asset_ttl, metavar="SECONDS",
      help="how long result images live (default: %(default)s)")
    a("--upload-ttl", type=float, default=d.upload_ttl, metavar="SECONDS",
      help="how long uploads live (default: %(default)s)")
    a("--fault-seed", type=int, default=d.fault_seed, help="seed of the fault RNG")
    a("--api-key", action="append", default=[], metavar="KEY",
      help="accept only this key (repeatable); default: any key starting with afk_")
    a("--inactive-key", action="append", default=[], metavar="KEY",
      help="a key that exists but is inactive (403)")
    a("--render", choices=("full", "fast"), default=d.render_mode,
      help="full: gradient + prompt text; fast: flat colour (default: %(default)s)")
    a("--log-level", default="info", help="uvicorn log level (default: %(default)s)")
    a("--state-dir", type=Path, default=None, metavar="DIR",
      help="keep the simulated world (jobs, idempotency keys, credits, uploads) in DIR, so "
      "that a restarted simulator on the same DIR continues it (default: in memory only)")
    a("--access-log", action="store_true",
      help="log every request, one line each (off by default: a run of 3,000 items writes "
      "about 1 MB of them)")


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    """``SimSettings`` from the parsed flags."""
    return SimSettings(
        job_seconds=args.job_seconds,
        queue_seconds=args.queue_seconds,
        rps=args.rps,
        burst=args.burst,
        max_inflight=args.max_inflight,
        error_rate=args.error_rate,
        drop_rate=args.drop_rate,
        fail_rate=args.fail_rate,
        fail_capacity_share=args.fail_capacity_share,
        truncate_rate=args.truncate_rate,
        corrupt_rate=args.corrupt_rate,
        download_bytes_per_second=args.download_bps,
        stall_rate=args.stall_rate,
        stall_seconds=args.stall_seconds,
        storm_seconds=args.storm_seconds,
        storm_retry_after=args.storm_retry_after,
        webhook_drop_rate=args.webhook_drop_rate,
        webhook_dup_rate=args.webhook_dup_rate,
        webhook_delay=args.webhook_delay,
        credits=args.credits,
        cost_per_image=args.cost_per_image,
        asset_ttl=args.asset_ttl,
        upload_ttl=args.upload_ttl,
        fault_seed=args.fault_seed,
        api_keys=tuple(args.api_key),
        inactive_keys=tuple(args.inactive_key),
        render_mode=args.render,
    )


def _quiet_drops() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropLogFilter) for f in logger.filters):
        logger.addFilter(DropLogFilter())


def main(args: argparse.Namespace) -> int:
    """Run the simulator in the foreground until interrupted."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"batchflux sim serve: {exc}")
        return 2
    try:
        app = create_app(settings, state_dir=args.state_dir)
    except SimStateError as exc:
        print(f"batchflux sim serve: {exc}", file=sys.stderr)
        return 1
    _quiet_drops()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            lifespan="on", access_log=args.access_log)
    try:
        uvicorn.Server(config).run()
    finally:
        app.close()
    return 0


@contextmanager
def serve_in_thread(
    settings: SimSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    app: Any = None,
    startup_timeout: float = 30.0,
) -> Iterator[str]:
    """Run the simulator with uvicorn in a background thread; yield its base URL.

    >>> import httpx
    >>> with serve_in_thread(SimSettings(job_seconds=0.2)) as base_url:
    ...     httpx.get(f"{base_url}/v2/me", headers={"X-API-Key": "afk_x"}).json()["team"]["credits"]
    1000

    ``app`` serves an app you built yourself (``create_app(...)``, to keep a handle on its
    ``state.sim``); otherwise one is created from ``settings``. Port 0 picks a free port.
    """
    _quiet_drops()
    app = app if app is not None else create_app(settings or SimSettings())
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP;
    # without it a response written in two parts waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name=f"batchflux-sim:{bound_port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the simulator did not start")
            time.sleep(0.01)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=startup_timeout)
        sock.close()


__all__ = ["add_arguments", "main", "serve_in_thread", "settings_from_args"]
