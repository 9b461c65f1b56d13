"""Issue 13, point 9: `batchflux sim serve` wrote an access-log line for every request (976 KB
for 3,000 items). Off by default; `--access-log` turns them on."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

REQUESTS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_and_call(*flags: str) -> str:
    """Run `batchflux sim serve` on a free port, make ``REQUESTS`` requests, stop it with
    SIGINT and return everything it printed (stdout and stderr)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "batchflux", "sim", "serve", "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/_sim/stats", timeout=1)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the simulator did not start: {server.communicate()[0]}")
                time.sleep(0.05)
        with httpx.Client(base_url=base, timeout=5) as client:
            for n in range(REQUESTS):
                path = "/v2/models" if n % 2 else "/_sim/stats"
                assert client.get(path).status_code == 200
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    return output


def access_lines(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if '"GET /v2/models HTTP/1.1"' in line or '"GET /_sim/stats HTTP/1.1"' in line]


def test_sim_serve_logs_no_request_by_default() -> None:
    output = serve_and_call()
    assert "Uvicorn running on http://127.0.0.1:" in output  # its output was captured
    assert access_lines(output) == []


def test_sim_serve_access_log_logs_every_request() -> None:
    output = serve_and_call("--access-log")
    lines = access_lines(output)
    assert len(lines) >= REQUESTS  # the 20, and the start-up probes
    assert sum('"GET /v2/models HTTP/1.1" 200' in line for line in lines) == REQUESTS // 2
