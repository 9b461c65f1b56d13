from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest

from batchflux.apiframe import (
    MAX_JSON_BYTES,
    ApiframeClient,
    DownloadInfo,
    JobState,
    SubmitResult,
    Timeouts,
    UploadResult,
)
from batchflux.errors import ApiError, ConfigError
from batchflux.models import ErrorCategory

KEY = "afk_test_0123456789abcdef"
BASE = "https://api.test"
JOB_ID = "3f2b8c1e-7d4a-4b8e-9c2f-1a2b3c4d5e6f"
BODY = {"prompt": "a red mug", "model": "flux-2-dev",
        "fluxParams": {"aspect_ratio": "1:1", "seed": 7}}


def _client(handler: Callable[[httpx.Request], httpx.Response], **kwargs: object) -> ApiframeClient:
    return ApiframeClient(api_key=KEY, base_url=kwargs.pop("base_url", BASE),  # type: ignore[arg-type]
                          transport=httpx.MockTransport(handler), **kwargs)  # type: ignore[arg-type]


def _job(**overrides: object) -> dict[str, object]:
    job: dict[str, object] = {
        "id": JOB_ID, "status": "QUEUED", "model": "flux-2-dev", "progress": 0,
        "result": None, "error": None, "creditCost": 2, "webhookStatus": None,
        "createdAt": "2026-03-15T10:00:00.000Z", "completedAt": None, "expired": False,
    }
    job.update(overrides)
    return job


class ListSink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


async def _raises(coro: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        await coro  # type: ignore[misc]
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    return info.value


# --- submit ------------------------------------------------------------------------------


async def test_submit_sends_key_idempotency_key_and_json_and_returns_the_job() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"jobId": JOB_ID, "status": "QUEUED"})

    async with _client(handler) as api:
        result = await api.submit(BODY, idempotency_key="batchflux-abc")
    assert result == SubmitResult(job_id=JOB_ID, status="QUEUED", replayed=False)
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/v2/images/generate"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["idempotency-key"] == "batchflux-abc"
    assert request.headers["accept"] == "application/json"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("batchflux/")
    assert KEY not in str(request.url)
    assert json.loads(request.content) == BODY


async def test_submit_without_idempotency_key_sends_none() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "idempotency-key" not in request.headers
        return httpx.Response(202, json={"jobId": JOB_ID, "status": "QUEUED"})

    async with _client(handler) as api:
        assert (await api.submit(BODY, idempotency_key=None)).job_id == JOB_ID


async def test_submit_reports_a_replay_when_the_server_says_so() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, json={"jobId": JOB_ID, "status": "COMPLETED"},
                              headers={"Idempotent-Replayed": "true"})

    async with _client(handler) as api:
        result = await api.submit(BODY, idempotency_key="k")
    assert result.replayed and result.status == "COMPLETED"


async def test_submit_serialises_read_only_mappings() -> None:
    from types import MappingProxyType

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["fluxParams"] == {"seed": 1}
        return httpx.Response(202, json={"jobId": JOB_ID, "status": "QUEUED"})

    body = {"prompt": "p", "model": "flux-2-dev", "fluxParams": MappingProxyType({"seed": 1})}
    async with _client(handler) as api:
        await api.submit(body, idempotency_key=None)


# --- get_job -----------------------------------------------------------------------------


async def test_get_job_parses_a_completed_job() -> None:
    urls = [f"https://cdn2.apiframe.ai/images/{JOB_ID}-1.webp"]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v2/jobs/{JOB_ID}"
        assert request.headers["x-api-key"] == KEY
        return httpx.Response(200, json=_job(status="COMPLETED", progress=100,
                                             result={"images": urls},
                                             completedAt="2026-03-15T10:00:10.000Z"))

    async with _client(handler) as api:
        job = await api.get_job(JOB_ID)
    assert job == JobState(id=JOB_ID, status="COMPLETED", progress=100, images=tuple(urls),
                           error=None, credit_cost=2, created_at="2026-03-15T10:00:00.000Z",
                           completed_at="2026-03-15T10:00:10.000Z", expired=False)
    assert job.is_terminal


@pytest.mark.parametrize(
    ("fields", "terminal"),
    [
        (dict(status="QUEUED"), False),
        (dict(status="PROCESSING", progress=40), False),
        (dict(status="FAILED", error="No available capacity — please retry shortly",
              creditCost=0), True),
        (dict(status="CANCELLED"), True),
    ],
)
async def test_get_job_statuses(fields: dict[str, object], terminal: bool) -> None:
    async with _client(lambda r: httpx.Response(200, json=_job(**fields))) as api:
        job = await api.get_job(JOB_ID)
    assert job.status == fields["status"] and job.is_terminal is terminal
    assert job.images == ()


async def test_get_job_accepts_the_old_bare_url_result_and_missing_optional_fields() -> None:
    body = {"id": JOB_ID, "status": "COMPLETED", "result": "https://cdn.apiframe.ai/r.png"}
    async with _client(lambda r: httpx.Response(200, json=body)) as api:
        job = await api.get_job(JOB_ID)
    assert job.images == ("https://cdn.apiframe.ai/r.png",)
    assert (job.progress, job.credit_cost, job.expired) == (None, None, False)


async def test_get_job_404_is_a_lost_job() -> None:
    async with _client(lambda r: httpx.Response(404, json={"error": "Job not found"})) as api:
        err = await _raises(api.get_job(JOB_ID))
    assert err.category is ErrorCategory.LOST
    assert not err.retryable and err.http_status == 404
    assert "job not found" in err.message


# --- error translation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "category", "retryable", "retry_after"),
    [
        (400, {"error": "Validation failed",
               "details": {"fluxParams.aspect_ratio": ["Invalid"]}}, {},
         ErrorCategory.INVALID_REQUEST, False, None),
        (401, {"error": "Invalid API key"}, {}, ErrorCategory.AUTH, False, None),
        (403, {"error": "API key is inactive"}, {}, ErrorCategory.AUTH, False, None),
        (402, {"error": "Insufficient credits", "creditsRequired": 2, "creditsAvailable": 1},
         {}, ErrorCategory.INSUFFICIENT_CREDITS, False, None),
        (409, {"error": "Idempotency key reused with a different request body"}, {},
         ErrorCategory.INVALID_REQUEST, False, None),
        (429, {"error": "Rate limit exceeded"}, {"Retry-After": "3"},
         ErrorCategory.RATE_LIMITED, True, 3.0),
        (429, {"error": "Rate limit exceeded"}, {}, ErrorCategory.RATE_LIMITED, True, None),
        (503, {"error": "Queue unavailable"}, {"Retry-After": "5"},
         ErrorCategory.SERVER_ERROR, True, 5.0),
        (500, None, {}, ErrorCategory.SERVER_ERROR, True, None),
        (502, "<html>bad gateway</html>", {}, ErrorCategory.SERVER_ERROR, True, None),
        (418, {"error": "teapot"}, {}, ErrorCategory.INVALID_REQUEST, False, None),
    ],
)
async def test_http_errors_are_translated(status: int, body: object, headers: dict[str, str],
                                          category: ErrorCategory, retryable: bool,
                                          retry_after: float | None) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers=headers)
        if body is None:
            return httpx.Response(status, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    async with _client(handler) as api:
        err = await _raises(api.submit(BODY, idempotency_key="k"))
    assert (err.category, err.retryable, err.http_status, err.retry_after) == (
        category, retryable, status, retry_after)
    assert err.message.startswith(f"POST /v2/images/generate: HTTP {status}")
    if isinstance(body, dict):
        assert body["error"] in err.message


async def test_400_keeps_the_validation_details_and_402_the_credit_figures() -> None:
    details = {"fluxParams.seed": ["Expected integer"], "prompt": ["Too long"]}
    responses = iter([
        httpx.Response(400, json={"error": "Validation failed", "details": details}),
        httpx.Response(402, json={"error": "Insufficient credits", "creditsRequired": 4,
                                  "creditsAvailable": 1}),
    ])
    async with _client(lambda r: next(responses)) as api:
        err = await _raises(api.submit(BODY, idempotency_key="k"))
        assert err.details == details
        err = await _raises(api.submit(BODY, idempotency_key="k"))
        assert err.details == {"creditsRequired": 4, "creditsAvailable": 1}


@pytest.mark.parametrize(
    ("exc", "category"),
    [
        (httpx.ConnectTimeout("slow"), ErrorCategory.TIMEOUT),
        (httpx.ReadTimeout("slow"), ErrorCategory.TIMEOUT),
        (httpx.ConnectError("refused"), ErrorCategory.NETWORK),
        (httpx.RemoteProtocolError("peer closed"), ErrorCategory.NETWORK),
        (httpx.ReadError("reset"), ErrorCategory.NETWORK),
    ],
)
async def test_transport_failures_are_retryable(exc: Exception, category: ErrorCategory) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with _client(handler) as api:
        err = await _raises(api.get_job(JOB_ID))
    assert err.category is category and err.retryable and err.http_status is None
    assert err.__cause__ is exc


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(202, text="not json"),
        httpx.Response(202, json=["a", "list"]),
        httpx.Response(202, json={"status": "QUEUED"}),
        httpx.Response(202, json={"jobId": 5, "status": "QUEUED"}),
        httpx.Response(202, content=b"{" + b" " * MAX_JSON_BYTES + b"}"),
    ],
    ids=["not-json", "list", "no-jobId", "jobId-not-str", "too-large"],
)
async def test_malformed_success_answers_are_retryable_server_errors(
        response: httpx.Response) -> None:
    async with _client(lambda r: response) as api:
        err = await _raises(api.submit(BODY, idempotency_key="k"))
    assert err.category is ErrorCategory.SERVER_ERROR and err.retryable
    assert "POST /v2/images/generate" in err.message


async def test_oversized_answer_without_content_length_stops_reading() -> None:
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        while True:
            produced += 1
            yield b" " * 65536

    async with _client(lambda r: httpx.Response(200, content=endless())) as api:
        err = await _raises(api.get_job(JOB_ID))
    assert err.category is ErrorCategory.SERVER_ERROR
    assert produced <= MAX_JSON_BYTES // 65536 + 2


@pytest.mark.parametrize("body", [{"id": JOB_ID, "status": "DONE"},
                                  {"id": JOB_ID, "status": "COMPLETED", "progress": "50"},
                                  {"id": JOB_ID, "status": "COMPLETED",
                                   "result": {"images": [1]}},
                                  {"status": "QUEUED"}])
async def test_malformed_job_records_are_server_errors(body: dict[str, object]) -> None:
    async with _client(lambda r: httpx.Response(200, json=body)) as api:
        err = await _raises(api.get_job(JOB_ID))
    assert err.category is ErrorCategory.SERVER_ERROR and err.retryable


async def test_the_key_is_redacted_from_echoed_server_text() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": f"Invalid API key {KEY}"})

    async with _client(handler) as api:
        err = await _raises(api.me())
        assert "[REDACTED]" in err.message
        assert KEY not in repr(api)


# --- other routes ------------------------------------------------------------------------


async def test_me_and_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/me":
            assert request.headers["x-api-key"] == KEY
            return httpx.Response(200, json={"user": {"id": "u"}, "team": {"credits": 50}})
        assert request.url.path == "/v2/models"
        assert request.url.params["modality"] == "image"
        assert "x-api-key" not in request.headers  # public route: no reason to send the key
        return httpx.Response(200, json={"models": [{"id": "flux-2-dev", "label": "Flux 2 Dev",
                                                     "modality": "image"}]})

    async with _client(handler) as api:
        assert (await api.me())["team"]["credits"] == 50
        assert [m["id"] for m in await api.models()] == ["flux-2-dev"]


async def test_upload_sends_multipart_field_file() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 32

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"].startswith("multipart/form-data")
        assert request.headers["x-api-key"] == KEY
        body = request.content
        assert b'name="file"; filename="ref.png"' in body and png in body
        return httpx.Response(201, json={
            "id": "u-1", "url": "https://cdn2.apiframe.ai/uploads/u-1.png", "kind": "image",
            "contentType": "image/png", "byteSize": len(png),
            "expiresAt": "2026-03-15T12:00:00.000Z"})

    async with _client(handler) as api:
        result = await api.upload(png, filename="ref.png")
    assert result == UploadResult(id="u-1", url="https://cdn2.apiframe.ai/uploads/u-1.png",
                                  content_type="image/png", byte_size=len(png),
                                  expires_at="2026-03-15T12:00:00.000Z")


# --- download ----------------------------------------------------------------------------


async def test_download_streams_chunks_without_the_api_key() -> None:
    chunks = [bytes([i]) * 1000 for i in range(5)]

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        assert "x-api-key" not in request.headers
        assert request.url.host == "cdn2.apiframe.ai"
        return httpx.Response(200, content=body(), headers={"content-type": "image/webp",
                                                            "content-length": "5000"})

    sink = ListSink()
    async with _client(handler) as api:
        info = await api.download(f"https://cdn2.apiframe.ai/images/{JOB_ID}-1.webp", sink)
    assert info == DownloadInfo(bytes=5000, content_type="image/webp")
    assert sink.chunks == chunks  # written as they came, not gathered first


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        (f"{BASE}/cdn/img.png", None, True),  # the API's own host
        ("https://cdn2.apiframe.ai/images/x.png", None, True),
        ("http://cdn2.apiframe.ai/images/x.png", None, False),  # plain http off the API host
        ("https://evil.example/x.png", None, False),
        ("https://apiframe.ai.evil.example/x.png", None, False),
        ("file:///etc/passwd", None, False),
        ("ftp://cdn2.apiframe.ai/x.png", None, False),
        ("https://user:pw@cdn2.apiframe.ai/x.png", None, False),
        ("https://images.example/x.png", ["images.example"], True),
        ("https://other.example/x.png", ["images.example"], False),
        ("http://anything.example/x.png", ["*"], True),
        ("file:///etc/passwd", ["*"], False),
    ],
)
async def test_download_url_policy(url: str, allowed: list[str] | None, ok: bool) -> None:
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requested.append(str(request.url))
        return httpx.Response(200, content=b"img")

    sink = ListSink()
    async with _client(handler, allowed_download_hosts=allowed) as api:
        if ok:
            assert (await api.download(url, sink)).bytes == 3
        else:
            err = await _raises(api.download(url, sink))
            assert err.category is ErrorCategory.DOWNLOAD_FAILED and not err.retryable
            assert requested == []


async def test_download_follows_a_redirect_only_to_an_allowed_host() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ok":
            return httpx.Response(302, headers={"location": "https://cdn3.apiframe.ai/real"})
        if request.url.path == "/bad":
            return httpx.Response(302, headers={"location": "https://evil.example/x"})
        assert request.url.host == "cdn3.apiframe.ai"
        return httpx.Response(200, content=b"image")

    async with _client(handler) as api:
        assert (await api.download("https://cdn2.apiframe.ai/ok", ListSink())).bytes == 5
        err = await _raises(api.download("https://cdn2.apiframe.ai/bad", ListSink()))
    assert not err.retryable


@pytest.mark.parametrize(
    ("status", "category", "retryable"),
    [
        (404, ErrorCategory.EXPIRED, False),
        (410, ErrorCategory.EXPIRED, False),
        (500, ErrorCategory.DOWNLOAD_FAILED, True),
        (503, ErrorCategory.DOWNLOAD_FAILED, True),
        (429, ErrorCategory.DOWNLOAD_FAILED, True),
        (403, ErrorCategory.DOWNLOAD_FAILED, False),
    ],
)
async def test_download_http_errors(status: int, category: ErrorCategory,
                                    retryable: bool) -> None:
    async with _client(lambda r: httpx.Response(status, text="nope")) as api:
        err = await _raises(api.download("https://cdn2.apiframe.ai/i.png", ListSink()))
    assert (err.category, err.retryable, err.http_status) == (category, retryable, status)


async def test_download_over_the_limit_stops_reading_at_once() -> None:
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        while True:
            produced += 1
            yield b"x" * 1000

    sink = ListSink()
    async with _client(lambda r: httpx.Response(200, content=endless())) as api:
        err = await _raises(api.download("https://cdn2.apiframe.ai/i.png", sink,
                                         max_bytes=10_000))
    assert err.category is ErrorCategory.DOWNLOAD_FAILED and not err.retryable
    assert produced == 11 and len(sink.data) == 10_000


async def test_download_refuses_a_declared_length_over_the_limit_without_reading() -> None:
    async def body() -> AsyncIterator[bytes]:
        raise AssertionError("must not be read")
        yield b""  # pragma: no cover

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-length": "99999"})

    sink = ListSink()
    async with _client(handler) as api:
        err = await _raises(api.download("https://cdn2.apiframe.ai/i.png", sink,
                                         max_bytes=1000))
    assert not err.retryable and sink.chunks == []


async def test_download_short_body_is_a_retryable_failure() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 500

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-length": "1000"})

    async with _client(handler) as api:
        err = await _raises(api.download("https://cdn2.apiframe.ai/i.png", ListSink()))
    assert err.category is ErrorCategory.DOWNLOAD_FAILED and err.retryable
    assert "500 of 1000" in err.message


async def test_download_cut_short_by_a_real_server_is_retryable() -> None:
    """A real loopback HTTP/1.1 server that promises 1000 bytes and hangs up after 500."""

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            assert b"x-api-key" not in request.lower()
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                              b"Content-Length: 1000\r\n\r\n" + b"x" * 500)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        async with ApiframeClient(api_key=KEY, base_url=f"http://127.0.0.1:{port}",
                                  timeouts=Timeouts(read=10.0)) as api:
            err = await _raises(api.download(f"http://127.0.0.1:{port}/img.png", ListSink()))
        tg.cancel_scope.cancel()
    assert err.category is ErrorCategory.DOWNLOAD_FAILED and err.retryable
    assert isinstance(err.__cause__, httpx.TransportError)


async def test_connection_refused_on_loopback_is_a_retryable_network_error() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there any more
    async with ApiframeClient(api_key=KEY, base_url=f"http://127.0.0.1:{port}") as api:
        err = await _raises(api.get_job(JOB_ID))
    assert err.category is ErrorCategory.NETWORK and err.retryable


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "kwargs", "ok"),
    [
        ("https://api.apiframe.ai", {}, True),
        ("http://127.0.0.1:8123", {}, True),
        ("http://127.9.9.9:8123", {}, True),
        ("http://localhost:8123", {}, True),
        ("http://[::1]:8123", {}, True),
        ("http://api.example", {}, False),
        ("http://api.example", {"allow_insecure": True}, True),
        ("ftp://api.example", {}, False),
        ("not a url", {}, False),
        ("https://user:pw@api.example", {}, False),
    ],
)
def test_base_url_rules(base_url: str, kwargs: dict[str, object], ok: bool) -> None:
    if ok:
        ApiframeClient(api_key=KEY, base_url=base_url, **kwargs)  # type: ignore[arg-type]
    else:
        with pytest.raises(ConfigError) as info:
            ApiframeClient(api_key=KEY, base_url=base_url, **kwargs)  # type: ignore[arg-type]
        assert KEY not in str(info.value)


def test_plain_http_is_fine_through_an_in_process_asgi_transport() -> None:
    async def app(scope: object, receive: object, send: object) -> None:  # pragma: no cover
        raise AssertionError

    ApiframeClient(api_key=KEY, base_url="http://sim.local",
                   transport=httpx.ASGITransport(app=app))


def test_every_lane_of_every_client_shares_one_tls_context(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """-j 128 opens 21 lanes (httpx clients); each built its own TLS context, loading the CA
    bundle again, and a run builds its client twice: 1.3 s before the first request. One
    context, still verifying certificates and host names, serves them all."""
    import ssl

    from batchflux import apiframe

    made: list[ssl.SSLContext] = []
    create = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        context = create(*args, **kwargs)  # type: ignore[arg-type]
        made.append(context)
        return context

    monkeypatch.setattr(ssl, "create_default_context", counting)
    apiframe._tls_context.cache_clear()
    clients = [ApiframeClient(api_key=KEY, max_connections=164) for _ in range(2)]
    assert len(clients[0]._lanes) == 21
    assert len(made) == 1
    assert made[0].verify_mode == ssl.CERT_REQUIRED and made[0].check_hostname


@pytest.mark.parametrize("key", ["", "   ", "afk_x\r\nX-Evil: 1", " afk_x"])
def test_bad_keys_are_config_errors(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        ApiframeClient(api_key=key)
    assert "afk_x" not in str(info.value)


# --- against the simulator ---------------------------------------------------------------

from batchflux import sim  # noqa: E402  (the simulator ships in the package)


async def test_full_job_against_the_in_process_simulator() -> None:
    import io

    from PIL import Image

    now = [1_800_000_000.0]
    app = sim.create_app(sim.SimSettings(job_seconds=(4.0, 4.0), queue_seconds=(1.0, 1.0),
                                         render_mode="fast"),
                         clock=lambda: now[0])
    body = {"prompt": "a red mug", "model": "flux-2-dev",
            "fluxParams": {"aspect_ratio": "16:9", "seed": 7, "output_format": "png"}}
    async with ApiframeClient(api_key=KEY, base_url="http://sim.local",
                              transport=httpx.ASGITransport(app=app)) as api:
        accepted = await api.submit(body, idempotency_key="batchflux-t-0")
        assert accepted.status == "QUEUED"
        again = await api.submit(body, idempotency_key="batchflux-t-0")
        assert again.job_id == accepted.job_id  # replayed, not a second job
        conflict = await _raises(api.submit({**body, "prompt": "other"},
                                            idempotency_key="batchflux-t-0"))
        assert conflict.http_status == 409 and not conflict.retryable

        now[0] += 3.0
        job = await api.get_job(accepted.job_id)
        assert job.status == "PROCESSING" and not job.is_terminal
        now[0] += 10.0
        job = await api.get_job(accepted.job_id)
        assert job.status == "COMPLETED" and len(job.images) == 1

        sink = ListSink()
        info = await api.download(job.images[0], sink)
        image = Image.open(io.BytesIO(sink.data))
        assert image.format == "PNG" and info.bytes == len(sink.data)
        assert image.width > image.height  # 16:9; the exact size is the simulator's to define

        bad = await _raises(api.submit({"prompt": "", "model": "flux-2-dev"},
                                       idempotency_key=None))
        assert bad.category is ErrorCategory.INVALID_REQUEST and bad.details
        missing = await _raises(api.get_job("00000000-0000-4000-8000-000000000000"))
        assert missing.message.endswith("job not found")
        assert (await api.me())["team"]["credits"] >= 0
        assert any(m["id"] == "flux-2-dev" for m in await api.models())


async def test_real_simulator_rate_limit_auth_and_truncated_download() -> None:
    settings = sim.SimSettings(job_seconds=(0.05, 0.05), queue_seconds=(0.0, 0.0),
                               rps=1.0, burst=1, truncate_rate=1.0, render_mode="fast",
                               api_keys=(KEY,))
    body = {"prompt": "a red mug", "model": "flux-2-dev", "fluxParams": {"seed": 1}}
    with sim.serve_in_thread(settings) as base_url:
        async with ApiframeClient(api_key="afk_wrong_key", base_url=base_url) as api:
            err = await _raises(api.submit(body, idempotency_key=None))
            assert err.category is ErrorCategory.AUTH and err.http_status == 401
        async with ApiframeClient(api_key=KEY, base_url=base_url) as api:
            accepted = await api.submit(body, idempotency_key=None)
            limited = await _raises(api.submit(body, idempotency_key=None))
            assert limited.category is ErrorCategory.RATE_LIMITED and limited.retryable
            assert limited.retry_after is not None and limited.retry_after > 0
            job = await api.get_job(accepted.job_id)
            while not job.is_terminal:
                await anyio.sleep(0.05)
                job = await api.get_job(accepted.job_id)
            assert job.status == "COMPLETED"
            cut = await _raises(api.download(job.images[0], ListSink()))
            assert cut.category is ErrorCategory.DOWNLOAD_FAILED and cut.retryable
