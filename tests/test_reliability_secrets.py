"""Secrets hygiene: the API key never leaves in an exception, a log line at any level, the rich
progress display or a file; it is sent only to the API host; TLS verification stays on; plain
http is for loopback only unless forced."""

from __future__ import annotations

import io
import logging
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from runner_helpers import check_run_directory, write_manifest

from batchflux import batch
from batchflux.apiframe import ApiframeClient, Timeouts
from batchflux.config import Api
from batchflux.errors import ApiError, ConfigError
from batchflux.models import RunOptions
from batchflux.progress import RichReporter
from batchflux.sim import SimSettings, create_app, serve_in_thread

KEY = "afk_reliability_secret_7d1e0b2c94"
FAST = SimSettings(job_seconds=0.2, queue_seconds=0.05, render_mode="fast", credits=100_000)


def assert_no_key(text: str | bytes, where: str = "") -> None:
    data = text.encode() if isinstance(text, str) else text
    assert KEY.encode() not in data, where
    assert KEY[4:].encode() not in data, where  # not even without its prefix


def echo_key(request: httpx.Request) -> httpx.Response:
    """A hostile or buggy server that repeats the key it was sent in every answer."""
    sent = request.headers.get("x-api-key", "")
    path = request.url.path
    if path == "/v2/images/generate":
        return httpx.Response(400, json={"error": f"bad key {sent}",
                                         "details": {"X-API-Key": [f"{sent} is odd"]}})
    if path.startswith("/v2/jobs/a"):
        return httpx.Response(500, json={"error": f"internal: {sent}"})
    if path.startswith("/v2/jobs/b"):
        return httpx.Response(200, content=f"<html>{sent}</html>".encode())
    if path.startswith("/v2/jobs/c"):
        return httpx.Response(200, json={"id": sent, "status": f"weird {sent}"})
    if path.startswith("/v2/jobs/d"):
        raise httpx.ConnectError(f"connection to {sent}@host failed")
    if path.startswith("/v2/jobs/e"):
        raise httpx.ReadTimeout(f"timed out reading for {sent}")
    if path == "/v2/uploads":
        return httpx.Response(201, json={"id": 1, "url": sent})
    return httpx.Response(429, json={"error": sent}, headers={"retry-after": sent})


@pytest.mark.parametrize("call", ["submit", "a", "b", "c", "d", "e", "upload", "me"])
async def test_no_exception_text_carries_the_key(call: str) -> None:
    client = ApiframeClient(api_key=KEY, base_url="https://api.example.com",
                            transport=httpx.MockTransport(echo_key))
    async with client:
        with pytest.raises(ApiError) as caught:
            if call == "submit":
                await client.submit({"prompt": "x"}, idempotency_key="k")
            elif call == "upload":
                await client.upload(b"\x89PNG\r\n\x1a\n", filename="a.png")
            elif call == "me":
                await client.me()
            else:
                await client.get_job(call + "0000000-0000-0000-0000-000000000000")
    exc = caught.value
    assert_no_key(str(exc), "str")
    assert_no_key(repr(exc), "repr")
    assert_no_key(repr(vars(exc)), "attributes")
    assert_no_key(repr(client), "client repr")


def test_a_bad_key_is_refused_without_echoing_it() -> None:
    for bad in (KEY + "\n", " " + KEY, KEY + "\0x"):
        with pytest.raises(ConfigError) as caught:
            ApiframeClient(api_key=bad)
        assert_no_key(str(caught.value))


async def test_the_key_goes_to_the_api_host_only_never_to_image_hosts(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    inner = httpx.ASGITransport(app=create_app(FAST))

    class Recording(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return await inner.handle_async_request(request)

    manifest = write_manifest(tmp_path, prompts=2, seeds=1)
    await batch.run_batch_async(manifest, RunOptions(out_dir=tmp_path / "out"),
                                target=Api(api_key=KEY, base_url="http://sim.local",
                                           transport=Recording(), allow_insecure=True))
    downloads = [r for r in seen if r.url.path.startswith("/cdn/")]
    api = [r for r in seen if r.url.path.startswith("/v2/") and r.url.path != "/v2/models"]
    assert downloads and api
    assert all("x-api-key" not in r.headers for r in downloads)
    assert all(r.headers["x-api-key"] == KEY for r in api)
    assert all(KEY not in str(r.url) for r in seen)


async def test_debug_logs_and_the_rich_display_never_show_the_key(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    console_out = io.StringIO()
    console = Console(file=console_out, force_terminal=True, width=120,
                      color_system="truecolor")
    reporter = RichReporter(console=console, banner=None)
    settings = replace(FAST, error_rate=0.2, drop_rate=0.1, fail_rate=0.3,
                       truncate_rate=0.2, stall_rate=0.1, stall_seconds=1.0, fault_seed=9)
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    with serve_in_thread(settings) as base_url:
        await batch.run_batch_async(manifest, RunOptions(out_dir=out),
                                    target=Api(api_key=KEY, base_url=base_url,
                                               timeouts=Timeouts(read=0.5)),
                                    reporter=reporter)
    check_run_directory(out, expected_items=12)
    assert caplog.records, "nothing was logged: the check would prove nothing"
    for record in caplog.records:
        assert_no_key(record.getMessage(), record.name)
        assert_no_key(repr(record.args), record.name)
    assert caplog.text
    assert_no_key(caplog.text)
    shown = console_out.getvalue()
    assert "\x1b[" in shown  # a real terminal rendering happened
    assert_no_key(shown, "progress display")
    for path in out.rglob("*"):
        if path.is_file():
            assert_no_key(path.read_bytes(), str(path))


# --------------------------------------------------------------------------------------------
# Transport security


@pytest.mark.parametrize("base_url", ["http://api.example.com", "http://10.0.0.8:8000",
                                      "http://127.0.0.1.example.com", "http://localhost.evil.io"])
def test_plain_http_to_a_non_loopback_host_is_refused_unless_forced(base_url: str) -> None:
    with pytest.raises(ConfigError, match="plain-http"):
        ApiframeClient(api_key=KEY, base_url=base_url)
    ApiframeClient(api_key=KEY, base_url=base_url, allow_insecure=True)  # forced: allowed


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:9", "http://localhost:9",
                                      "http://[::1]:9", "https://api.example.com"])
def test_loopback_http_and_any_https_are_allowed(base_url: str) -> None:
    ApiframeClient(api_key=KEY, base_url=base_url)


@pytest.fixture
def self_signed_tls_server(tmp_path: Path) -> Iterator[str]:
    """A loopback TLS server with a self-signed certificate for 127.0.0.1 (not trusted)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.fail(f"openssl cannot make a certificate (.ci/run installs openssl): "
                    f"{made.stderr.decode()[:200]}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    received.append(tls.recv(65536))
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: what we want

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        # Nothing the client sent (its headers, its key) ever reached the server in clear.
        assert all(KEY.encode() not in data for data in received)
        assert received == [] or all(not data for data in received)


async def test_tls_verification_stays_on(self_signed_tls_server: str) -> None:
    async with ApiframeClient(api_key=KEY, base_url=self_signed_tls_server,
                              timeouts=Timeouts(connect=5.0, read=5.0)) as client:
        with pytest.raises(ApiError) as caught:
            await client.me()
    assert caught.value.category.value == "network"
    assert "certificate" in str(caught.value).lower() or "ssl" in str(caught.value).lower()
    assert_no_key(str(caught.value))
