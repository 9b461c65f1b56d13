"""The ASGI app: routes, auth, validation, jobs, idempotency, uploads, images, test hooks.

Build it with ``create_app(settings)``; the world it serves lives in ``app.state.sim``
(a ``SimState``), in memory, or also in a state directory (``state_dir``) that a later app
continues. Routes outside ``/v2/`` and ``/cdn/`` (``/_sim/...``) are for tests and benchmarks
only.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from batchflux.models import FLUX_MODELS

from .faults import SimulatedDrop, retry_after_seconds, send_dropped
from .persist import SimStateError, StateJournal
from .render import CONTENT_TYPES, image_size, render_bytes, size_for
from .settings import SimSettings, settings_to_json, settings_with
from .state import Clock, Job, SimState, canonical_hash, iso_ms
from .validate import validate_generate
from .webhooks import WebhookSender

UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
IMAGE_NAME_RE = re.compile(r"^([0-9a-f-]{36})-(\d+)\.(jpg|png|webp)$")
UPLOAD_PATH_RE = re.compile(r"/cdn/uploads/([0-9a-f-]{36})\.[a-z0-9]+$")

_log = logging.getLogger(__name__)

MODEL_LABELS = {
    "flux-2-dev": "FLUX.2 [dev]", "flux-2-pro": "FLUX.2 [pro]", "flux-2-flex": "FLUX.2 [flex]",
    "flux-2-max": "FLUX.2 [max]", "flux-1.1-pro": "FLUX1.1 [pro]",
    "flux-1.1-pro-ultra": "FLUX1.1 [pro] Ultra",
}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=headers)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    return _json({"error": message, **extra}, status, headers)


def _state(request: Request) -> SimState:
    return request.app.state.sim  # type: ignore[no-any-return]


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


class _Dropped(Response):
    """A response that starts (status + headers), sends ``sent`` bytes, then drops the line."""

    def __init__(self, status: int, body: bytes, media_type: str, sent: int = 0) -> None:
        super().__init__(status_code=status)
        self._body, self._media_type, self._sent = body, media_type, sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_dropped(send, status=self.status_code, body=self._body, sent=self._sent,
                           headers=[(b"content-type", self._media_type.encode())])


def _dropped_json(data: Any, status: int) -> _Dropped:
    return _Dropped(status, json.dumps(data).encode(), "application/json")


# -- auth and injected errors ----------------------------------------------------------------------


def _authenticate(request: Request) -> tuple[str, None] | tuple[None, JSONResponse]:
    api_key = request.headers.get("x-api-key")
    if not api_key:
        return None, _error(401, "API key is required")
    settings = _state(request).settings
    if not settings.is_known_key(api_key):
        return None, _error(401, "Invalid API key")
    if api_key in settings.inactive_keys:
        return None, _error(403, "API key is inactive")
    _state(request).owner_of(api_key)  # remembered for signing its jobs' webhooks
    return api_key, None


def _injected_error(state: SimState, kind: str) -> JSONResponse | None:
    """A 500 or 503 with probability ``error_rate`` (drawn from the ``kind`` stream)."""
    if not state.plan.chance(kind + ":5xx", state.settings.error_rate):
        return None
    if state.plan.pick(kind + ":5xx-code", 0.5):
        state.counters.errors_injected["http_503"] += 1
        return _error(503, "Service temporarily unavailable", headers={"Retry-After": "1"})
    state.counters.errors_injected["http_500"] += 1
    return _error(500, "Internal server error")


def _drop(state: SimState, kind: str) -> bool:
    return state.plan.chance(kind + ":drop", state.settings.drop_rate)


def _in_storm(state: SimState, now: float) -> bool:
    """True while a 429 storm lasts: ``storm_seconds`` from the first submit on."""
    if state.settings.storm_seconds <= 0:
        return False
    if state.storm_started is None:
        state.storm_started = now
    return now < state.storm_started + state.settings.storm_seconds


async def _maybe_stall(state: SimState, kind: str) -> None:
    """Hold an answer back (the work is already done) so that the client's read times out."""
    if state.plan.chance(kind + ":stall", state.settings.stall_rate):
        state.counters.errors_injected["stall_" + kind] += 1
        await anyio.sleep(state.settings.stall_seconds)


# -- /v2/images/generate ---------------------------------------------------------------------------


def _input_size(state: SimState, body: dict[str, Any]) -> tuple[int, int] | None:
    """The first input image's size when it is one of our live uploads (no HTTP needed)."""
    images = body.get("fluxParams", {}).get("input_images") or []
    if not images:
        return None
    match = UPLOAD_PATH_RE.search(urlsplit(images[0]).path)
    upload = state.uploads.get(match.group(1)) if match else None
    if upload is None or upload.expires <= state.clock():
        return None
    return image_size(upload.data)


async def generate(request: Request) -> Response:
    state = _state(request)
    now = state.clock()
    state.settle(now)
    api_key, failure = _authenticate(request)
    if failure is not None:
        return failure
    assert api_key is not None
    owner = state.owner_of(api_key)
    settings = state.settings
    if (injected := _injected_error(state, "submit")) is not None:
        return injected
    if _in_storm(state, now):
        state.counters.rate_limited += 1
        state.counters.errors_injected["storm_429"] += 1
        return _error(429, "Rate limit exceeded",
                      headers={"Retry-After": str(settings.storm_retry_after)})
    drop = _drop(state, "submit")
    drop_after_create = state.plan.pick("submit:drop-when", settings.drop_after_create_share)

    wait = state.take_submit_token(api_key)
    if wait:
        state.counters.rate_limited += 1
        return _error(429, "Rate limit exceeded",
                      headers={"Retry-After": retry_after_seconds(wait)})

    idempotency_key = request.headers.get("idempotency-key")
    details: dict[str, list[str]] = {}
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        details["Idempotency-Key"] = ["Must be between 1 and 255 characters"]
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "Validation failed", details={**details, "": ["Invalid JSON body"]})
    details.update(validate_generate(body))
    if details:
        return _error(400, "Validation failed", details=details)

    body_hash = canonical_hash(body)
    if idempotency_key is not None:
        entry = state.idempotency.get((owner, idempotency_key))
        if entry is not None and entry.expires > now:
            if entry.body_hash != body_hash:
                return _error(409, "Idempotency key reused with a different request body")
            state.counters.idempotent_replays += 1
            original = state.jobs[entry.job_id]
            status, _ = original.status_at(now, settings.progress_steps)
            return _json({"jobId": original.id, "status": status}, 202)

    inflight_wait = state.inflight_wait(owner, now)
    if inflight_wait is not None:
        state.counters.rate_limited += 1
        return _error(429, "Rate limit exceeded",
                      headers={"Retry-After": retry_after_seconds(inflight_wait)})

    if state.credits < settings.cost_per_image:
        return _error(402, "Insufficient credits", creditsRequired=settings.cost_per_image,
                      creditsAvailable=max(0, state.credits))

    if drop and not drop_after_create:
        state.counters.errors_injected["drop_before_create"] += 1
        return _dropped_json({"jobId": str(uuid.uuid4()), "status": "QUEUED"}, 202)

    params = body.get("fluxParams", {})
    size = size_for(
        params.get("aspect_ratio", "1:1"),
        params.get("width"),
        params.get("height"),
        _input_size(state, body) if params.get("aspect_ratio") == "match_input_image" else None,
    )
    job = state.create_job(owner=owner, body=body, body_hash=body_hash, now=now, size=size,
                           base_url=_base_url(request), idempotency_key=idempotency_key)
    accepted = {"jobId": job.id, "status": "QUEUED"}
    await _maybe_stall(state, "submit")
    if drop:
        state.counters.errors_injected["drop_after_create"] += 1
        return _dropped_json(accepted, 202)
    return _json(accepted, 202)


# -- /v2/jobs --------------------------------------------------------------------------------------


async def get_job(request: Request) -> Response:
    state = _state(request)
    now = state.clock()
    state.settle(now)
    api_key, failure = _authenticate(request)
    if failure is not None:
        return failure
    if (injected := _injected_error(state, "poll")) is not None:
        return injected
    job_id = request.path_params["id"]
    if not UUID_RE.match(job_id):
        return _error(400, "Invalid job id: expected a UUID")
    assert api_key is not None
    job = state.jobs.get(job_id.lower())
    if job is None or job.owner != state.owner_of(api_key):
        return _error(404, "Job not found")
    data = state.job_json(job, now, _base_url(request))
    await _maybe_stall(state, "poll")
    if _drop(state, "poll"):
        state.counters.errors_injected["drop_poll"] += 1
        return _dropped_json(data, 200)
    return _json(data)


def _encode_cursor(position: int) -> str:
    raw = json.dumps({"i": position}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    padded = cursor + "=" * (-len(cursor) % 4)
    data = json.loads(base64.urlsafe_b64decode(padded))
    return int(data["i"])


async def list_jobs(request: Request) -> Response:
    state = _state(request)
    now = state.clock()
    state.settle(now)
    api_key, failure = _authenticate(request)
    if failure is not None:
        return failure
    assert api_key is not None
    query = request.query_params
    details: dict[str, list[str]] = {}
    status_filter = query.get("status")
    if status_filter is not None and status_filter not in (
            "QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"):
        details["status"] = ["Invalid enum value"]
    try:
        limit = int(query.get("limit", "20"))
        if not 1 <= limit <= 100:
            raise ValueError
    except ValueError:
        details["limit"] = ["Number must be an integer between 1 and 100"]
        limit = 20
    search = query.get("search")
    if search is not None and not UUID_RE.match(search):
        details["search"] = ["Invalid uuid"]
    if query.get("scope", "user") not in ("user", "team"):
        details["scope"] = ["Invalid enum value. Expected 'user' | 'team'"]
    start: int | None = None
    if "cursor" in query:
        try:
            start = _decode_cursor(query["cursor"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            details["cursor"] = ["Invalid cursor"]
    if details:
        return _error(400, "Validation failed", details=details)

    # Both lists are in creation order; a cursor is a position in the list being paged.
    keyed: list[Job] = (list(state.jobs.values()) if query.get("scope") == "team"
                        else state.jobs_by_key[state.owner_of(api_key)])
    position = len(keyed) if start is None else min(start, len(keyed))
    model_filter = query.get("model")
    page: list[Job] = []
    last = position
    more = False
    for i in range(position - 1, -1, -1):
        job = keyed[i]
        status, _ = job.status_at(now, state.settings.progress_steps)
        if status_filter and status != status_filter:
            continue
        if model_filter and job.model != model_filter:
            continue
        if search and job.id != search.lower():
            continue
        if len(page) == limit:
            more = True
            break
        page.append(job)
        last = i
    base = _base_url(request)
    body: dict[str, Any] = {
        "jobs": [state.job_json(job, now, base) for job in page],
        "nextCursor": _encode_cursor(last) if more else None,
        "hasMore": more,
    }
    if query.get("include_models") == "true":
        body["models"] = sorted({job.model for job in keyed})
    return _json(body)


# -- account, catalog ------------------------------------------------------------------------------


async def me(request: Request) -> Response:
    state = _state(request)
    state.settle(state.clock())
    api_key, failure = _authenticate(request)
    if failure is not None:
        return failure
    assert api_key is not None
    return _json(state.me_json(api_key))


async def models(request: Request) -> Response:
    modality = request.query_params.get("modality")
    if modality is not None and modality not in ("image", "video", "music"):
        return _error(400, "Validation failed",
                      details={"modality": [("Invalid enum value. Expected 'image' | 'video' "
                                             "| 'music'")]})
    cost = _state(request).settings.cost_per_image
    entries = [
        {"id": model, "label": MODEL_LABELS.get(model, model), "modality": "image",
         "description": f"{MODEL_LABELS.get(model, model)} (simulated)", "costMin": cost,
         "costMax": cost, "pricingMode": "flat", "paramsBlock": "fluxParams"}
        for model in FLUX_MODELS
    ]
    if modality in ("video", "music"):
        entries = []
    return _json({"models": entries})


# -- uploads ---------------------------------------------------------------------------------------

def sniff(data: bytes) -> tuple[str, str, str] | None:
    """``(content_type, kind, ext)`` from magic bytes, or None for an unsupported type."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", "image", "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", "image", "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp", "image", "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif", "image", "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav", "audio", "wav"
    if head.startswith(b"OggS"):
        return "audio/ogg", "audio", "ogg"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg", "audio", "mp3"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm", "video", "webm"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand.startswith(b"M4A"):
            return "audio/mp4", "audio", "m4a"
        if brand == b"qt  ":
            return "video/quicktime", "video", "mov"
        return "video/mp4", "video", "mp4"
    return None


async def upload(request: Request) -> Response:
    state = _state(request)
    now = state.clock()
    api_key, failure = _authenticate(request)
    if failure is not None:
        return failure
    assert api_key is not None
    if (injected := _injected_error(state, "upload")) is not None:
        return injected
    settings = state.settings
    try:
        async with request.form(max_files=1, max_fields=10) as form:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                return _error(400, "No file uploaded", details={"file": ["Required"]})
            data = await file.read(settings.max_video_upload_bytes + 1)
    except HTTPException as exc:  # malformed multipart
        return _error(400, f"Invalid multipart body: {exc.detail}")
    sniffed = sniff(data)
    if sniffed is None:
        return _error(400, "Unsupported file type",
                      details={"file": [("Expected PNG, JPEG, WebP, GIF, MP4, WebM, MOV, MP3, "
                                         "WAV, OGG or M4A")]})
    content_type, kind, ext = sniffed
    limit = settings.max_video_upload_bytes if kind == "video" else settings.max_upload_bytes
    if len(data) > limit:
        return _error(400, "File too large",
                      details={"file": [f"Must be at most {limit} bytes for {kind}"]})
    item = state.add_upload(owner=state.owner_of(api_key), data=data,
                            content_type=content_type, kind=kind, ext=ext, now=now)
    return _json({
        "id": item.id,
        "url": f"{_base_url(request)}/cdn/uploads/{item.id}.{ext}",
        "kind": kind,
        "contentType": content_type,
        "byteSize": len(data),
        "expiresAt": iso_ms(item.expires),
    }, 201)


async def get_upload(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["name"]
    item = state.uploads.get(name.rsplit(".", 1)[0])
    if item is None or item.expires <= state.clock() or not name.endswith("." + item.ext):
        return _error(404, "Not found")
    return Response(item.data, media_type=item.content_type)


# -- images ----------------------------------------------------------------------------------------


def _image_bytes(state: SimState, job: Job) -> bytes:
    mode = state.settings.render_mode
    if mode == "fast":
        key: Any = ("fast", job.size, job.output_format, job.quality, job.seed % 24)
    else:
        key = ("full", job.id)
    data = state.images.get(key)
    if data is None:
        data = render_bytes(prompt=job.prompt, seed=job.seed, size=job.size,
                            output_format=job.output_format, quality=job.quality,
                            aspect_label=job.aspect_ratio, mode=mode)
        state.images.put(key, data)
    return data


class _SlowBytes(Response):
    """Streams ``body`` at ``rate`` bytes per second."""

    def __init__(self, body: bytes, media_type: str, rate: float) -> None:
        super().__init__(status_code=200, media_type=media_type)
        self._data, self._rate = body, rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", (self.media_type or "").encode()),
            (b"content-length", str(len(self._data)).encode()),
        ]})
        chunk = max(1, int(self._rate / 20))
        for offset in range(0, len(self._data), chunk):
            part = self._data[offset:offset + chunk]
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await anyio.sleep(len(part) / self._rate)
        await send({"type": "http.response.body", "body": b""})


async def get_image(request: Request) -> Response:
    state = _state(request)
    now = state.clock()
    match = IMAGE_NAME_RE.match(request.path_params["name"])
    job = state.jobs.get(match.group(1)) if match else None
    if match is None or job is None or match.group(2) != "1" or \
            match.group(3) != job.output_format:
        return _error(404, "Not found")
    status, _ = job.status_at(now, state.settings.progress_steps)
    if status != "COMPLETED" or job.is_expired(now, state.settings.asset_ttl):
        return _error(404, "Not found")
    data = _image_bytes(state, job)
    media_type = CONTENT_TYPES[job.output_format]
    state.counters.downloads += 1
    settings = state.settings
    if state.plan.chance("download:corrupt", settings.corrupt_rate):
        state.counters.errors_injected["corrupt_image"] += 1
        data = data[: len(data) // 2]
    if state.plan.chance("download:truncate", settings.truncate_rate):
        state.counters.errors_injected["truncated_download"] += 1
        return _Dropped(200, data, media_type, sent=len(data) // 2)
    if settings.download_bytes_per_second:
        return _SlowBytes(data, media_type, settings.download_bytes_per_second)
    return Response(data, media_type=media_type)


# -- /_sim test hooks ------------------------------------------------------------------------------


async def sim_stats(request: Request) -> Response:
    state = _state(request)
    state.settle(state.clock())
    return _json(state.stats_json())


async def sim_jobs(request: Request) -> Response:
    """Every job ever created (the paid-job ledger of tests and benchmarks)."""
    state = _state(request)
    now = state.clock()
    state.settle(now)
    return _json({"jobs": state.ledger_json(now)})


async def sim_settings(request: Request) -> Response:
    state = _state(request)
    if request.method == "POST":
        try:
            patch = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            return _error(400, str(exc))
        if not isinstance(patch, dict):
            return _error(400, "expected a JSON object")
        try:
            state.update_settings(settings_with(state.settings, patch))
        except ValueError as exc:
            return _error(400, str(exc))
    return _json(settings_to_json(state.settings))


async def sim_reset(request: Request) -> Response:
    state = _state(request)
    state.reset()
    return _json({"ok": True})


async def sim_cancel(request: Request) -> Response:
    state = _state(request)
    job = state.jobs.get(request.path_params["id"])
    if job is None:
        return _error(404, "Job not found")
    now = state.clock()
    state.cancel(job, now)
    return _json(state.job_json(job, now, _base_url(request)))


# -- assembly --------------------------------------------------------------------------------------

ROUTES: tuple[tuple[str, str, Callable[[Request], Any]], ...] = (
    ("POST", "/v2/images/generate", generate),
    ("GET", "/v2/jobs/{id}", get_job),
    ("GET", "/v2/jobs", list_jobs),
    ("GET", "/v2/me", me),
    ("GET", "/v2/models", models),
    ("POST", "/v2/uploads", upload),
    ("GET", "/cdn/images/{name}", get_image),
    ("GET", "/cdn/uploads/{name}", get_upload),
    ("GET", "/_sim/stats", sim_stats),
    ("GET", "/_sim/jobs", sim_jobs),
    ("GET", "/_sim/settings", sim_settings),
    ("POST", "/_sim/settings", sim_settings),
    ("POST", "/_sim/reset", sim_reset),
    ("POST", "/_sim/jobs/{id}/cancel", sim_cancel),
)


class _Observe:
    """Outermost layer: ``X-Request-Id`` on every response, and per-route status counters."""

    def __init__(self, app: Starlette, state: SimState, labels: dict[Any, str]) -> None:
        self.app, self.state, self.labels = app, state, labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex.encode()
        status = "none"

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except SimulatedDrop:
            status = "dropped"
            raise
        finally:
            method = scope["method"]
            label = self.labels.get((method, scope.get("endpoint")), "other")
            self.state.counters.count_request(label, status)


async def _not_found(request: Request, exc: Exception) -> Response:
    code = getattr(exc, "status_code", 404)
    return _error(code, "Not found" if code == 404 else "Method not allowed")


async def _state_failure(request: Request, exc: Exception) -> Response:
    """The state directory could not take a change: nothing changed, the client may retry."""
    _log.error("simulator state: %s", exc)
    return _error(500, "Internal server error")


def create_app(
    settings: SimSettings | None = None,
    *,
    clock: Clock | None = None,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
    state_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """The simulator as an ASGI app.

    ``clock`` (Unix seconds, default ``time.time``) drives job progress, expiry and the rate
    limiter, so tests can move time by hand. ``webhook_transport`` replaces the HTTP transport
    used for webhook deliveries. The ``SimState`` is at ``app.state.sim``.

    ``state_dir`` keeps the world (jobs, idempotency keys, credits, uploads, cancels, webhook
    outcomes) in that directory, created if missing: every change is journaled before a client
    sees it, and a new app on the same directory, in this process or a later one, continues
    where the last one stopped, at the clock's current time (the default clock is wall time, so
    jobs kept running while no simulator did). One simulator at a time holds a directory; a
    new app in the same process takes it over from an older one. ``app.close()`` releases it.
    Raises :class:`~batchflux.sim.SimStateError` for a directory it cannot use (another
    process holds it, an unknown format version, a corrupt journal).

    >>> import httpx
    >>> app = create_app(SimSettings(job_seconds=0.5))
    >>> client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
    ...                            base_url="http://sim.local")
    >>> kept = create_app(SimSettings(), state_dir="out/.batchflux/sim")  # survives restarts
    """
    settings = settings or SimSettings()
    clock = clock or time.time
    journal = StateJournal.open(Path(state_dir), now=clock()) if state_dir is not None else None
    try:
        state = SimState(settings, clock=clock, journal=journal)
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    sender = WebhookSender(state, transport=webhook_transport)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.run)
            yield
            tg.cancel_scope.cancel()

    routes = [Route(path, endpoint, methods=[method]) for method, path, endpoint in ROUTES]
    inner = Starlette(routes=routes, lifespan=lifespan,
                      exception_handlers={404: _not_found, 405: _not_found,
                                          SimStateError: _state_failure})
    inner.state.sim = state
    labels = {(method, endpoint): f"{method} {path}" for method, path, endpoint in ROUTES}
    outer = _Observe(inner, state, labels)
    return _App(outer, inner, state)


class _App:
    """The ASGI callable handed out by ``create_app``: the observed Starlette app, with
    ``.state.sim`` and ``.router`` (for ``app.router.lifespan_context(app)``) passed through."""

    def __init__(self, outer: _Observe, inner: Starlette, state: SimState) -> None:
        self._outer, self.inner, self.sim = outer, inner, state
        self.state = inner.state
        self.router = inner.router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._outer(scope, receive, send)

    def close(self) -> None:
        """Release the state directory, if the app has one (the in-memory world stays
        readable; changes are refused from now on). Idempotent."""
        self.sim.close()
