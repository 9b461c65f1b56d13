"""The HTTP client for Apiframe's v2 API (httpx): submit, get_job, download, upload, me, models.

One call is one attempt: retries, backoff and rate limiting are the runner's job
(:mod:`batchflux.retry`, :mod:`batchflux.limits`). Every failure leaves this module as a
:class:`~batchflux.errors.ApiError` with a category, a retryable flag, the HTTP status and the
server's ``Retry-After``; httpx exceptions are translated here, once.

The API key travels only in the ``X-API-Key`` header and only to the API base URL: result
images (a CDN host on the real service) are fetched without it, and only from hosts the
download policy allows. The key never appears in a URL, a log line or an error message.

In a coroutine::

    async with ApiframeClient(api_key=key) as api:
        accepted = await api.submit(body, idempotency_key=item.idempotency_key)
        job = await api.get_job(accepted.job_id)
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import math
import mimetypes
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn, Protocol, Self, TypeAlias

import httpx

from . import __version__
from .errors import ApiError, ConfigError
from .models import ErrorCategory
from .retry import TERMINAL_STATUSES, parse_retry_after
from .wording import LIBRARY, Wording

__all__ = [
    "DEFAULT_BASE_URL",
    "ApiframeClient",
    "ByteSink",
    "DownloadInfo",
    "JobState",
    "SubmitResult",
    "Timeouts",
    "Transport",
    "UploadResult",
]

DEFAULT_BASE_URL = "https://api.apiframe.ai"

#: What carries the client's requests (``httpx.ASGITransport``, ``httpx.MockTransport``...):
#: named here so that modules that pass one along need not import httpx themselves.
Transport: TypeAlias = httpx.AsyncBaseTransport

#: JSON answers larger than this are refused (a job record is a few hundred bytes).
MAX_JSON_BYTES = 1 << 20
_MAX_REDIRECTS = 5
_LANE_CONNECTIONS = 8  # connections per httpx pool (see ApiframeClient.__init__)
_MAX_ERROR_TEXT = 300
_JOB_STATUSES = frozenset({"QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"})
_TRUSTED_DOWNLOAD_SUFFIX = ".apiframe.ai"
_NO_AUTH_JSON: dict[str, str] = {}
_DOWNLOAD_HEADERS = {"Accept": "*/*"}
_REPLAY_HEADERS = ("idempotent-replayed", "x-idempotent-replayed", "x-idempotency-replayed")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The one TLS context every lane of every client shares. Each httpx client otherwise
    builds its own and loads the CA bundle again (about 30 ms): ``-j 128`` opens 21 lanes and
    a run builds its client twice, so 1.3 s went by here before the first request."""
    return httpx.create_ssl_context()


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-request timeouts in seconds (``httpx.Timeout`` underneath)."""

    connect: float = 10.0
    read: float = 60.0
    write: float = 60.0
    pool: float = 30.0

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write,
                             pool=self.pool)


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """The answer to a submit: the job's id and status. ``replayed`` is True only when the
    server said so (an idempotent replay of an earlier submit); unknown means False."""

    job_id: str
    status: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class JobState:
    """One answer of ``GET /v2/jobs/{id}``, reduced to what batchflux uses.

    ``images`` are the result URLs exactly as the API gave them (never build them).
    """

    id: str
    status: str  # QUEUED | PROCESSING | COMPLETED | FAILED | CANCELLED
    progress: int | None
    images: tuple[str, ...]
    error: str | None
    credit_cost: int | None
    created_at: str | None
    completed_at: str | None
    expired: bool

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True, slots=True)
class UploadResult:
    """A file stored by ``POST /v2/uploads``; send ``url`` in ``input_images``."""

    id: str
    url: str
    content_type: str
    byte_size: int
    expires_at: str | None


@dataclass(frozen=True, slots=True)
class DownloadInfo:
    """What :meth:`ApiframeClient.download` wrote: byte count and the declared content type."""

    bytes: int
    content_type: str | None


class ByteSink(Protocol):
    """Where a download goes, chunk by chunk (e.g. an aiofiles file opened for writing)."""

    async def write(self, data: bytes) -> Any: ...


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _BodyTooLarge(Exception):
    pass


def _check_key(api_key: str) -> None:
    """Refuse a missing key, or one with whitespace or control characters (a header cannot
    carry it, and a pasted newline is a common mistake)."""
    if not api_key or not api_key.strip():
        raise ConfigError("no API key given (set APIFRAME_API_KEY)")
    if any(c in api_key for c in "\r\n\0") or api_key != api_key.strip():
        raise ConfigError("the API key contains whitespace or control characters")


def _check_base_url(base_url: str, *, local: bool, allow_insecure: bool,
                    wording: Wording) -> httpx.URL:
    """The API base URL, checked: http(s) with a host, no credentials or query, and plain
    http only on loopback (or ``local``: an in-process transport) unless ``allow_insecure``."""
    try:
        base = httpx.URL(base_url.rstrip("/"))
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"invalid API base URL {base_url!r}") from exc
    if base.scheme not in ("http", "https") or not base.host:
        raise ConfigError(f"API base URL must be http(s)://HOST, got {base_url!r}")
    if base.userinfo or base.query:
        raise ConfigError("API base URL must not carry credentials or a query string")
    if base.scheme == "http" and not (local or _is_loopback(base.host) or allow_insecure):
        raise ConfigError(
            f"refusing plain-http API base URL {base_url!r}: the API key would travel "
            f"unencrypted (use https, a loopback host, or {wording.allow_insecure})"
        )
    return base


@dataclass(frozen=True, slots=True)
class _Redactor:
    """Takes the API key out of text a server sent back (it may echo the key, or the key
    without its ``afk_`` prefix, which is as secret)."""

    api_key: str = field(repr=False)

    def __call__(self, text: str) -> str:
        text = text.replace(self.api_key, "[REDACTED]")
        body = self.api_key.removeprefix("afk_")
        return text.replace(body, "[REDACTED]") if len(body) >= 8 else text

    def json(self, value: Any) -> Any:
        """:meth:`__call__` over every string (keys too) of a JSON value."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(str(k)): self.json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        return value


@dataclass(frozen=True, slots=True)
class _DownloadPolicy:
    """Where result images may be fetched from: the API's own origin, https on
    ``*.apiframe.ai``, and the hosts the caller allowed (``"*"``: any http(s) host)."""

    base_origin: tuple[str, str, int | None]
    hosts: frozenset[str]
    any_host: bool
    wording: Wording

    @classmethod
    def of(cls, base: httpx.URL, allowed: Collection[str], wording: Wording) -> _DownloadPolicy:
        hosts = frozenset(h.lower() for h in allowed)
        return cls((base.scheme, base.host, base.port), hosts - {"*"}, "*" in hosts, wording)

    def check(self, url: str) -> httpx.URL:
        """``url`` parsed, or :class:`ApiError` (``download_failed``, not retryable)."""
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ApiError("refusing to download from a malformed URL",
                           category=ErrorCategory.DOWNLOAD_FAILED, retryable=False) from exc
        scheme, host = target.scheme, target.host.lower()
        if scheme in ("http", "https") and host and not target.userinfo and (
            (scheme, host, target.port) == self.base_origin
            or (scheme == "https" and host.endswith(_TRUSTED_DOWNLOAD_SUFFIX))
            or self.any_host
            or host in self.hosts
        ):
            return target
        raise ApiError(
            f"refusing to download from {scheme}://{host or '?'} (not the API host, not "
            f"https on *.apiframe.ai; {self.wording.allow_download_host} allows a host)",
            category=ErrorCategory.DOWNLOAD_FAILED, retryable=False,
        )


class ApiframeClient:
    """An async client for the Apiframe v2 API; one ``httpx.AsyncClient`` underneath.

    Use it as an async context manager (or call :meth:`aclose`). Settings are keyword-only:

    - ``transport``: any ``httpx.AsyncBaseTransport`` (``httpx.ASGITransport`` around the
      simulator, ``httpx.MockTransport`` in tests); None for real HTTP.
    - ``allowed_download_hosts``: extra hosts result images may be fetched from; ``"*"``
      allows any http(s) host. Always allowed: the base URL's own scheme and host, and https
      on ``*.apiframe.ai``.
    - ``allow_insecure``: permit a plain-http base URL on a non-loopback host.
    - ``wording``: how messages name the settings to change (:data:`~batchflux.wording.LIBRARY`,
      keyword arguments, unless the caller is the command line).

    Raises :class:`~batchflux.errors.ConfigError` for a missing/malformed key or a bad base URL.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        transport: httpx.AsyncBaseTransport | None = None,
        timeouts: Timeouts = Timeouts(),
        max_connections: int = 100,
        user_agent: str = f"batchflux/{__version__}",
        allowed_download_hosts: Collection[str] | None = None,
        allow_insecure: bool = False,
        wording: Wording = LIBRARY,
    ) -> None:
        _check_key(api_key)
        base = _check_base_url(base_url, local=isinstance(transport, httpx.ASGITransport),
                               allow_insecure=allow_insecure, wording=wording)
        if max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        self.base_url = base
        self._redact = _Redactor(api_key)
        self._downloads = _DownloadPolicy.of(base, allowed_download_hosts or (), wording)
        self._auth = {"X-API-Key": api_key}
        self._auth_json = {**self._auth, "Content-Type": "application/json"}
        # httpcore's pool does O(connections^2) bookkeeping on every request and response,
        # which at 64 connections costs more CPU than the rest of the request. Several small
        # pools ("lanes"), used in turn, keep that cost flat. An injected transport is one lane.
        lanes = 1 if transport is not None else math.ceil(max_connections / _LANE_CONNECTIONS)
        per_lane = math.ceil(max_connections / lanes)
        self._lanes = tuple(
            httpx.AsyncClient(
                base_url=base,
                transport=transport,
                verify=_tls_context() if transport is None else True,
                timeout=timeouts.to_httpx(),
                limits=httpx.Limits(max_connections=per_lane,
                                    max_keepalive_connections=per_lane),
                headers={"Accept": "application/json", "User-Agent": user_agent},
                follow_redirects=False,
            )
            for _ in range(lanes)
        )
        self._client = self._lanes[0]
        self._next_lane = itertools.cycle(self._lanes).__next__

    def __repr__(self) -> str:
        return f"ApiframeClient(base_url={str(self.base_url)!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        for lane in self._lanes:
            await lane.aclose()

    # --- public calls ----------------------------------------------------------------------

    async def submit(self, body: Mapping[str, Any], *,
                     idempotency_key: str | None) -> SubmitResult:
        """``POST /v2/images/generate``: start one job. Send an ``idempotency_key`` so that a
        retried submit (e.g. after a lost response) returns the original job, not a new one."""
        headers = self._auth_json
        if idempotency_key is not None:
            headers = {**self._auth_json, "Idempotency-Key": idempotency_key}
        route = "POST /v2/images/generate"
        try:
            content = _dumps(body)
        except (TypeError, ValueError) as exc:
            raise ApiError(f"{route}: request body is not JSON-serialisable: {exc}",
                           category=ErrorCategory.INVALID_REQUEST, retryable=False) from exc
        response, data = await self._call("POST", "/v2/images/generate", route,
                                          headers=headers, content=content)
        job_id, status = data.get("jobId"), data.get("status")
        if not isinstance(job_id, str) or not job_id or not isinstance(status, str):
            _bad_shape(self._redact, route, response, "expected {jobId, status}")
        replayed = data.get("replayed") is True or any(
            response.headers.get(name, "").lower() == "true" for name in _REPLAY_HEADERS
        )
        return SubmitResult(job_id=job_id, status=status, replayed=replayed)

    async def get_job(self, job_id: str) -> JobState:
        """``GET /v2/jobs/{id}``: the job's current state. A 404 is LOST ("job not found":
        the API forgets jobs after about 24 h), which no retry of the same request fixes."""
        path = f"/v2/jobs/{job_id}"
        route = f"GET {path}"
        try:
            response, data = await self._call("GET", path, route, headers=self._auth,
                                              not_found="job not found")
        except ApiError as exc:
            if exc.http_status == 404:
                raise ApiError(exc.message, category=ErrorCategory.LOST, retryable=False,
                               http_status=404) from exc
            raise
        return _job_state(self._redact, route, response, data)

    async def me(self) -> dict[str, Any]:
        """``GET /v2/me``: user, team (with ``credits``) and key details."""
        _, data = await self._call("GET", "/v2/me", "GET /v2/me", headers=self._auth)
        return data

    async def models(self) -> list[dict[str, Any]]:
        """``GET /v2/models?modality=image``: the public image model catalogue (no key sent)."""
        route = "GET /v2/models"
        response, data = await self._call("GET", "/v2/models", route, headers=_NO_AUTH_JSON,
                                          params={"modality": "image"})
        models = data.get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            _bad_shape(self._redact, route, response, "expected {models: [...]}")
        return models

    async def upload(self, data: bytes, *, filename: str) -> UploadResult:
        """``POST /v2/uploads`` (multipart field ``file``): store a reference image briefly."""
        route = "POST /v2/uploads"
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        response, body = await self._call(
            "POST", "/v2/uploads", route, headers=self._auth,
            files={"file": (filename, data, content_type)},
        )
        try:
            return UploadResult(
                id=_str(body["id"]),
                url=_str(body["url"]),
                content_type=_str(body.get("contentType") or content_type),
                byte_size=_int(body.get("byteSize", len(data))),
                expires_at=_opt_str(body.get("expiresAt")),
            )
        except (KeyError, TypeError) as exc:
            _bad_shape(self._redact, route, response,
                       "expected {id, url, contentType, byteSize}", exc)

    async def download(self, url: str, sink: ByteSink, *,
                       max_bytes: int = 64 << 20) -> DownloadInfo:
        """Stream a result image into ``sink``, chunk by chunk, without the API key.

        Raises ``ApiError``: EXPIRED (404/410, not retryable); DOWNLOAD_FAILED retryable for
        5xx, 429, network errors, timeouts and short bodies; DOWNLOAD_FAILED not retryable for
        a refused URL (scheme/host policy), other 4xx, or a body over ``max_bytes`` (reading
        stops at once). On failure ``sink`` may hold a partial body: discard it.
        """
        target = self._downloads.check(url)
        for _ in range(_MAX_REDIRECTS + 1):
            label = f"GET {target.host}{target.path}"
            try:
                client = self._next_lane()
                request = client.build_request("GET", target, headers=_DOWNLOAD_HEADERS)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        target = self._downloads.check(
                            str(response.url.join(response.headers["location"])))
                        continue
                    return await self._stream_body(label, response, sink, max_bytes)
                finally:
                    await response.aclose()
            except ApiError:
                raise
            except httpx.TimeoutException as exc:
                raise ApiError(f"{label}: timed out ({type(exc).__name__})",
                               category=ErrorCategory.DOWNLOAD_FAILED, retryable=True) from exc
            except httpx.TransportError as exc:
                raise ApiError(
                    f"{label}: connection failed or body cut short ({type(exc).__name__}: "
                    f"{self._redact(str(exc))})",
                    category=ErrorCategory.DOWNLOAD_FAILED, retryable=True,
                ) from exc
        raise ApiError(f"download of {url!r}: too many redirects",
                       category=ErrorCategory.DOWNLOAD_FAILED, retryable=False)

    # --- internals -------------------------------------------------------------------------

    async def _stream_body(self, label: str, response: httpx.Response, sink: ByteSink,
                           max_bytes: int) -> DownloadInfo:
        status = response.status_code
        if status != 200:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status in (404, 410):
                raise ApiError(f"{label}: HTTP {status}: image expired or not found",
                               category=ErrorCategory.EXPIRED, retryable=False,
                               http_status=status)
            raise ApiError(f"{label}: HTTP {status}",
                           category=ErrorCategory.DOWNLOAD_FAILED,
                           retryable=status >= 500 or status in (408, 429),
                           http_status=status, retry_after=retry_after)
        declared = _content_length(response)
        if declared is not None and declared > max_bytes:
            raise ApiError(f"{label}: {declared} bytes is over the {max_bytes}-byte limit",
                           category=ErrorCategory.DOWNLOAD_FAILED, retryable=False,
                           http_status=status)
        written = 0
        async for chunk in response.aiter_bytes():
            written += len(chunk)
            if written > max_bytes:
                raise ApiError(f"{label}: body is over the {max_bytes}-byte limit",
                               category=ErrorCategory.DOWNLOAD_FAILED, retryable=False,
                               http_status=status)
            await sink.write(chunk)
        # Content-Length counts the bytes on the wire, which differ from ours when encoded.
        received = (response.num_bytes_downloaded if "content-encoding" in response.headers
                    else written)
        if declared is not None and received != declared:
            raise ApiError(
                f"{label}: short body ({received} of {declared} bytes)",
                category=ErrorCategory.DOWNLOAD_FAILED, retryable=True, http_status=status)
        return DownloadInfo(bytes=written, content_type=response.headers.get("content-type"))

    async def _call(
        self,
        method: str,
        path: str,
        route: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        files: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        not_found: str | None = None,
    ) -> tuple[httpx.Response, dict[str, Any]]:
        """One request to the API: returns the response and its JSON object, or raises."""
        try:
            client = self._next_lane()
            request = client.build_request(method, path, headers=headers,
                                                 content=content, files=files, params=params)
            response = await client.send(request, stream=True)
            try:
                content = await _read_capped(response, MAX_JSON_BYTES)
            finally:
                await response.aclose()
        except _BodyTooLarge as exc:
            raise ApiError(f"{route}: answer larger than {MAX_JSON_BYTES} bytes",
                           category=ErrorCategory.SERVER_ERROR, retryable=True) from exc
        except httpx.TimeoutException as exc:
            raise ApiError(f"{route}: timed out ({type(exc).__name__})",
                           category=ErrorCategory.TIMEOUT, retryable=True) from exc
        except httpx.TransportError as exc:
            raise ApiError(
                f"{route}: network error ({type(exc).__name__}: {self._redact(str(exc))})",
                category=ErrorCategory.NETWORK, retryable=True,
            ) from exc
        if 200 <= response.status_code < 300:
            try:
                data = _loads(content)
            except ValueError as exc:
                _bad_shape(self._redact, route, response, "not JSON", exc)
            if not isinstance(data, dict):
                _bad_shape(self._redact, route, response, "expected a JSON object")
            return response, data
        raise _status_error(self._redact, route, response, content, not_found=not_found)

def _status_error(redact: _Redactor, route: str, response: httpx.Response, content: bytes,
                  *, not_found: str | None) -> ApiError:
    """The :class:`ApiError` for a non-2xx answer: its category, whether a retry can help,
    the server's text (redacted), Retry-After and details."""
    status = response.status_code
    try:
        body = _loads(content) if content else None
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    text = body.get("error")
    text = redact(text[:_MAX_ERROR_TEXT]) if isinstance(text, str) and text else None
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    details: dict[str, object] = {}
    category: ErrorCategory
    retryable: bool
    if status == 400:
        category, retryable = ErrorCategory.INVALID_REQUEST, False
        if isinstance(body.get("details"), dict):
            details = redact.json(dict(body["details"]))
    elif status in (401, 403):
        category, retryable = ErrorCategory.AUTH, False
    elif status == 402:
        category, retryable = ErrorCategory.INSUFFICIENT_CREDITS, False
        details = redact.json(
            {k: body[k] for k in ("creditsRequired", "creditsAvailable") if k in body})
    elif status == 404:
        category, retryable = ErrorCategory.INVALID_REQUEST, False
        text = not_found or text or "not found"
    elif status == 409:
        category, retryable = ErrorCategory.INVALID_REQUEST, False
        text = text or "idempotency key reused with a different request body"
    elif status == 429:
        category, retryable = ErrorCategory.RATE_LIMITED, True
    elif status == 408:
        category, retryable = ErrorCategory.TIMEOUT, True
    elif status >= 500:
        category, retryable = ErrorCategory.SERVER_ERROR, True
    elif 400 <= status < 500:
        category, retryable = ErrorCategory.INVALID_REQUEST, False
    else:  # 1xx/3xx: we follow no redirects on the API
        category, retryable = ErrorCategory.SERVER_ERROR, False
        text = text or "unexpected answer"
    message = f"{route}: HTTP {status}" + (f": {text}" if text else "")
    return ApiError(message, category=category, retryable=retryable, http_status=status,
                    retry_after=retry_after, details=details)

def _job_state(redact: _Redactor, route: str, response: httpx.Response,
               data: dict[str, Any]) -> JobState:
    try:
        status = data["status"]
        if status not in _JOB_STATUSES:
            raise TypeError(f"unknown status {status!r}")
        progress = data.get("progress")
        if progress is not None:
            progress = _int(progress)
        return JobState(
            id=_str(data["id"]),
            status=status,
            progress=progress,
            images=_images(data.get("result")),
            error=_opt_str(data.get("error")),
            credit_cost=None if data.get("creditCost") is None else _int(data["creditCost"]),
            created_at=_opt_str(data.get("createdAt")),
            completed_at=_opt_str(data.get("completedAt")),
            expired=data.get("expired") is True,
        )
    except (KeyError, TypeError) as exc:
        _bad_shape(redact, route, response, "not a job record", exc)

def _bad_shape(redact: _Redactor, route: str, response: httpx.Response, what: str,
               exc: BaseException | None = None) -> NoReturn:
    detail = f" ({redact(str(exc))})" if exc is not None and str(exc) else ""
    raise ApiError(
        f"{route}: HTTP {response.status_code} but the answer is malformed: {what}{detail}",
        category=ErrorCategory.SERVER_ERROR, retryable=True,
        http_status=response.status_code,
    ) from exc


async def _read_capped(response: httpx.Response, cap: int) -> bytes:
    declared = _content_length(response)
    if declared is not None and "content-encoding" not in response.headers:
        if declared > cap:
            raise _BodyTooLarge
        return await response.aread()
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        buffer += chunk
        if len(buffer) > cap:
            raise _BodyTooLarge
    return bytes(buffer)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):  # e.g. a MappingProxyType inside WorkItem.params
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dumps(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default).encode()


def _loads(content: bytes) -> Any:
    return json.loads(content)  # ValueError (JSONDecodeError, UnicodeDecodeError) on garbage


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _images(result: Any) -> tuple[str, ...]:
    if result is None:
        return ()
    if isinstance(result, str):  # the older docs' bare-URL form
        return (result,)
    if isinstance(result, dict):
        images = result.get("images")
        if images is None:
            return ()
        if isinstance(images, list) and all(isinstance(u, str) for u in images):
            return tuple(images)
    raise TypeError("result.images must be a list of URLs")
