"""``batchflux review OUT``: serve the review app with uvicorn, on loopback by default.

The socket is bound here, before uvicorn starts, so a port in use is a clear error
(:class:`PortInUseError`, exit 75) instead of a log line, and ``--port 0`` (or no ``--port``
when :data:`DEFAULT_PORT` is taken) gets a free port whose URL is printed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import uvicorn

from ..errors import EXIT_TEMPFAIL, BatchfluxError, UsageError
from .app import create_app
from .decisions import REVIEW_NAME

__all__ = ["DEFAULT_PORT", "PortInUseError", "bind_socket", "is_loopback", "review_command",
           "url_of"]

DEFAULT_PORT = 8765


class PortInUseError(BatchfluxError):
    """The port asked for with ``--port`` is taken (exit 75: try again later, or another)."""

    exit_code = EXIT_TEMPFAIL


def is_loopback(host: str) -> bool:
    """True for ``127.0.0.1``, ``::1``, ``localhost`` and the rest of 127/8."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int | None) -> socket.socket:
    """A TCP socket bound to ``host``: on ``port`` exactly (:class:`PortInUseError` if taken),
    on a free port for 0, or on :data:`DEFAULT_PORT` falling back to a free one for None."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    for candidate in ((DEFAULT_PORT, 0) if port is None else (port,)):
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bare, candidate))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and port is None:
                continue
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"port {port} on {host} is in use (another review, or another program); "
                    "pick another with --port, or --port 0 for any free port") from exc
            raise UsageError(f"cannot listen on {host} port {candidate}: "
                             f"{exc.strerror or exc}") from exc
    raise AssertionError("unreachable: port 0 always binds")  # pragma: no cover


def url_of(sock: socket.socket) -> str:
    """``http://127.0.0.1:8765/`` for a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def review_command(out_dir: str, *, host: str = "127.0.0.1", port: int | None = None,
                   open_browser: bool = False, out: TextIO | None = None,
                   err: TextIO | None = None,
                   opener: Callable[[str], object] = webbrowser.open,
                   include_all: bool = False) -> int:
    """Serve the review app over ``out_dir`` until Ctrl-C; then 0. The app shows the items of
    the run's current manifest, or with ``include_all`` every item (see :func:`create_app`)."""
    out, err = out or sys.stdout, err or sys.stderr
    loopback = is_loopback(host)
    app = create_app(out_dir, loopback_only=loopback, include_all=include_all)
    sock = bind_socket(host, port)
    url = url_of(sock)
    print(f"batchflux: reviewing {out_dir} at {url}  (decisions: "
          f"{Path(out_dir) / REVIEW_NAME}; Ctrl-C stops)", file=out, flush=True)
    if not loopback:
        print(f"batchflux: warning: listening on {host}: anyone who can reach it can see the "
              "images and record decisions", file=err, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off"))
    if open_browser:
        def open_when_up() -> None:
            deadline = time.monotonic() + 30
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            if server.started:
                opener(url)

        threading.Thread(target=open_when_up, name="batchflux-review-open", daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then re-raises the signal
        pass
    finally:
        sock.close()
    print("batchflux: review stopped; every decision is in "
          f"{Path(out_dir) / REVIEW_NAME}", file=out, flush=True)
    return 0
