"""The simulator in its own process: uvicorn on a free loopback port.

``python -m bench.simproc '{"rps": 40}'`` binds 127.0.0.1:0, prints ``{"port": N}`` on one
line, then serves until terminated. :class:`SimProcess` starts it, talks to its ``/_sim``
routes and reads its CPU time from /proc.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from .measure import process_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent


class SimProcess:
    """A running simulator process (context manager).

    >>> with SimProcess({"rps": 40, "render_mode": "fast"}) as sim:   # doctest: +SKIP
    ...     sim.base_url, sim.stats()["jobs_created"]
    """

    def __init__(self, settings: dict[str, Any], *, http: str = "auto") -> None:
        self.settings = settings
        self.http = http
        self._proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def __enter__(self) -> Self:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.simproc", json.dumps(self.settings), self.http],
            cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(10)
            raise RuntimeError("the simulator process did not start")
        self.base_url = f"http://127.0.0.1:{json.loads(line)['port']}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.base_url}/_sim/stats", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/_sim/stats", timeout=30)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        """Forget jobs, idempotency keys, counters and limiter state (between two clients)."""
        httpx.post(f"{self.base_url}/_sim/reset", timeout=30).raise_for_status()

    def configure(self, patch: dict[str, Any]) -> None:
        """Change settings of the running simulator (``POST /_sim/settings``)."""
        httpx.post(f"{self.base_url}/_sim/settings", json=patch, timeout=30).raise_for_status()


def submit_requests(stats: dict[str, Any]) -> dict[str, int]:
    """Answers to ``POST /v2/images/generate`` by status code."""
    return dict(stats["requests"].get("POST /v2/images/generate", {}))


def requests_total(stats: dict[str, Any], *labels: str) -> int:
    return sum(sum(stats["requests"].get(label, {}).values()) for label in labels)


def main(argv: list[str]) -> int:
    import uvicorn

    from batchflux.sim import SimSettings, create_app
    from batchflux.sim.faults import DropLogFilter
    from batchflux.sim.settings import settings_with

    settings = settings_with(SimSettings(), json.loads(argv[0]) if argv else {})
    http = argv[1] if len(argv) > 1 else "auto"
    import logging
    logging.getLogger("uvicorn.error").addFilter(DropLogFilter())
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every response written in two parts waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on",
                            access_log=False, http=http, backlog=2048)  # type: ignore[arg-type]
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
