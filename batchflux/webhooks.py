"""The run's webhook receiver: Apiframe POSTs each job's end here, signed, and the waiting item
downloads at once, without asking the API.

::

    Apiframe --POST (X-Webhook-Signature)--> [your proxy] --> receiver (HOST:PORT, the URL's path)
        verify the raw body -> parse the event -> WebhookMailbox.deliver -> the waiting item

Signature scheme (Apiframe's, as its official SDK verifies it): the secret is the raw 32-byte
SHA-256 digest of the API key; the header carries ``sha256=<hex>`` (or the bare hex) of
HMAC-SHA256(secret, raw body), compared in constant time. The receiver holds only that digest,
never the key.

Answers: 204 to a verified event (whatever it says: an event for a job this run does not know,
or one it already had, is counted, not refused, so the provider stops retrying it), 401 to a
missing or wrong signature, 413 to a body over ``max_body``, 400 to a signed body that is not an
event, 405 to another method on the path and 404 to any other path. The receiver runs with
uvicorn inside the run's own event loop (:meth:`WebhookReceiver.serve`, in the run's task
group), on a socket bound before anything is spent (:func:`bind_listener`), and is checked by a
request of our own before the first submit (:func:`probe`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .completion import JobEvent, WebhookMailbox
from .errors import ConfigError

__all__ = [
    "MAX_EVENT_BYTES",
    "SIGNATURE_HEADER",
    "WebhookReceiver",
    "bind_listener",
    "parse_event",
    "probe",
    "sign",
    "signing_secret",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Webhook-Signature"
#: An event is a few hundred bytes; anything far larger is refused unread.
MAX_EVENT_BYTES = 64 * 1024
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_STATUSES = frozenset({"QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"})


# --------------------------------------------------------------------------------------------
# Signatures


def signing_secret(api_key: str) -> bytes:
    """The HMAC key Apiframe signs with: the raw SHA-256 digest of the API key (32 bytes)."""
    return hashlib.sha256(api_key.encode()).digest()


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Webhook-Signature`` value Apiframe sends for ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """True when ``header`` (``sha256=<hex>`` or bare hex, either case) is the HMAC-SHA256 of
    the raw ``body`` under ``secret``; the comparison takes the same time wherever it differs.

    >>> secret = signing_secret("afk_example")
    >>> verify_signature(secret, b'{"jobId":"x"}', sign(secret, b'{"jobId":"x"}'))
    True
    >>> verify_signature(secret, b'{"jobId":"y"}', sign(secret, b'{"jobId":"x"}'))
    False
    """
    if not header:
        return False
    text = header.strip()
    text = text.removeprefix("sha256=")
    if not _HEX.match(text) or len(text) % 2:
        return False
    provided = bytes.fromhex(text)
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    return hmac.compare_digest(provided, expected)


# --------------------------------------------------------------------------------------------
# Events


def parse_event(body: bytes) -> JobEvent:
    """The job state a verified webhook body tells. Raises ``ValueError`` for a body that is
    not an event: not JSON, no ``jobId``, an unknown ``status``, or a ``completed`` event
    without an image URL (the fallback poll then finds the job)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not JSON") from exc
    if not isinstance(data, dict):
        data = {}
    job_id, status = data.get("jobId"), data.get("status")
    if not isinstance(job_id, str) or not job_id:
        raise ValueError("no jobId")
    if status not in _STATUSES:
        raise ValueError(f"unknown status {status!r}")
    images = _images(data.get("result"))
    if status == "COMPLETED" and not images:
        raise ValueError("a completed event without images")
    return JobEvent(
        id=job_id, status=status, progress=_optional(data.get("progress"), int),
        images=images, error=_optional(data.get("error"), str),
        credit_cost=_optional(data.get("creditCost"), int),
        completed_at=_optional(data.get("completedAt"), str),
        event=str(data.get("event") or status.lower()))


def _optional(value: Any, kind: type[Any]) -> Any:
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        return None
    return value


def _images(result: Any) -> tuple[str, ...]:
    """``result.images`` (or the older docs' bare URL string)."""
    if isinstance(result, str):
        return (result,)
    if isinstance(result, dict):
        images = result.get("images")
        if isinstance(images, list) and all(isinstance(u, str) for u in images):
            return tuple(images)
    return ()


# --------------------------------------------------------------------------------------------
# The receiver


class WebhookReceiver:
    """The receiver's ASGI app and its server (uvicorn, in the caller's event loop).

    ``secret`` is :func:`signing_secret` of the run's API key; ``path`` the path of the public
    webhook URL (a proxy forwards it unchanged); verified events go to ``mailbox``, and every
    request on the path is counted in ``mailbox.counters``.
    """

    def __init__(self, *, mailbox: WebhookMailbox, secret: bytes, path: str = "/",
                 max_body: int = MAX_EVENT_BYTES) -> None:
        self.mailbox = mailbox
        self.path = path or "/"
        self.max_body = max_body
        self._secret = secret
        self._server: _Server | None = None
        self._stopped: anyio.Event | None = None
        self.app = Starlette(routes=[Route(self.path, self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        counters = self.mailbox.counters
        counters.received += 1
        body = await self._read(request)
        if body is None:
            counters.malformed += 1
            return Response("event too large\n", status_code=413, media_type="text/plain")
        if not verify_signature(self._secret, body, request.headers.get(SIGNATURE_HEADER)):
            counters.rejected += 1
            return Response("missing or wrong signature\n", status_code=401,
                            media_type="text/plain")
        counters.verified += 1
        try:
            event = parse_event(body)
        except ValueError as exc:
            counters.malformed += 1
            return Response(f"not an event: {exc}\n", status_code=400, media_type="text/plain")
        self.mailbox.deliver(event)
        return Response(status_code=204)

    async def _read(self, request: Request) -> bytes | None:
        """The raw body, or None when it is over ``max_body`` (not read further)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                return None
        return bytes(body)

    async def serve(self, sock: socket.socket, *,
                    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve on ``sock`` (from :func:`bind_listener`) until :meth:`stop` or cancelled;
        ``task_status.started()`` once it accepts connections. Closes ``sock``."""
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", log_config=None,
                                access_log=False, server_header=False,
                                timeout_graceful_shutdown=2)
        server = self._server = _Server(config)
        self._stopped = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve, [sock])
                while not server.started:
                    if server.should_exit:
                        raise ConfigError("the webhook receiver did not start")
                    await anyio.sleep(0.01)
                task_status.started()
        finally:
            sock.close()
            self._stopped.set()

    async def stop(self, *, timeout: float = 5.0) -> None:
        """Stop serving: answers in progress finish first (for up to ``timeout`` seconds)."""
        if self._server is None or self._stopped is None:
            return
        self._server.should_exit = True
        with anyio.move_on_after(timeout):
            await self._stopped.wait()


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the run handles SIGINT and SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_listener(host: str, port: int, *, setting: str = "webhook_listen") -> socket.socket:
    """A listening TCP socket on ``host:port``, bound now so that a taken port is known before
    anything is spent. Raises :class:`~batchflux.errors.ConfigError` (exit 78) naming
    ``setting`` when the address cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen for webhooks on {host}:{port}: {exc.strerror} "
                          f"(change {setting})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        # SO_REUSEADDR lets the next run take the port while the last one's closed connections
        # linger (TIME_WAIT); on POSIX it never lets two sockets listen on one address, so a
        # port another process listens on is still refused.
        if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = ("the port is already in use (another batchflux run, or another program)"
                  if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
        raise ConfigError(f"cannot listen for webhooks on {host}:{port}: {reason}; choose "
                          f"another address with {setting} (and point the webhook URL's "
                          "proxy at it)") from exc
    return sock


async def probe(host: str, port: int, path: str, *, timeout: float = 5.0) -> None:
    """Check that the receiver answers on ``host:port`` as itself: a GET on its path must be
    answered 405 (it takes POST only). Raises :class:`~batchflux.errors.ConfigError`."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = (f"GET {path} HTTP/1.1\r\nHost: {shown}\r\nConnection: close\r\n"
               "User-Agent: batchflux-probe\r\n\r\n").encode()
    answer = b""
    try:
        with anyio.fail_after(timeout):
            async with await anyio.connect_tcp(target, port) as stream:
                await stream.send(request)
                while b"\r\n" not in answer and len(answer) < 4096:
                    answer += await stream.receive()
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        raise ConfigError(f"the webhook receiver does not answer on {shown}: "
                          f"{exc or type(exc).__name__}") from exc
    first = answer.split(b"\r\n", 1)[0]
    status = first.split()
    if len(status) < 2 or status[1] != b"405":
        line = first.decode(errors="replace")
        raise ConfigError(f"something other than batchflux's webhook receiver answers on "
                          f"{shown}: {line!r}")
