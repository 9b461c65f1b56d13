"""Misbehaviour on purpose: fault decisions, the submit token bucket, and dropped connections.

Every random decision comes from a per-kind stream seeded from ``fault_seed`` (one stream for
submits, one for polls, one for downloads, one for job outcomes...), so the n-th submit meets the
same fate in every run with the same seed, however the polls interleave with it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from starlette.types import Send

from .settings import SimSettings, spread_bounds

CONTENT_POLICY_ERROR = "Provider returned an error: content policy violation"
CAPACITY_ERROR = "No available capacity — please retry shortly"



class SimulatedDrop(httpx.RemoteProtocolError):
    """Raised inside the app to drop the connection after the response has started.

    Under uvicorn the server closes the socket mid-response, so the client's httpx raises its
    own ``RemoteProtocolError`` ("peer closed connection without sending complete message
    body"). In-process (``httpx.ASGITransport``) this exception itself reaches the client, and
    being a ``RemoteProtocolError`` it is caught exactly like the real thing.
    """


class DropLogFilter(logging.Filter):
    """Keeps uvicorn's error log free of tracebacks for drops we injected on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedDrop)


@dataclass(frozen=True, slots=True)
class JobFate:
    """What will happen to a new job, decided at submission."""

    queue_seconds: float
    run_seconds: float  # PROCESSING time until COMPLETED, or until FAILED
    error: str | None  # None: COMPLETED


class FaultPlan:
    """Seeded per-kind random streams and the decisions drawn from them."""

    def __init__(self, seed: int | None) -> None:
        self._seed = seed
        self._streams: dict[str, random.Random] = {}

    def _stream(self, kind: str) -> random.Random:
        stream = self._streams.get(kind)
        if stream is None:
            if self._seed is None:
                stream = random.Random()
            else:
                digest = hashlib.sha256(f"{self._seed}:{kind}".encode()).digest()
                stream = random.Random(int.from_bytes(digest[:8], "big"))
            self._streams[kind] = stream
        return stream

    def chance(self, kind: str, rate: float) -> bool:
        """True with probability ``rate`` (always draws, so streams stay aligned)."""
        draw = self._stream(kind).random()
        return rate > 0.0 and draw < rate

    def pick(self, kind: str, share: float) -> bool:
        return self._stream(kind).random() < share

    def uniform(self, kind: str, low: float, high: float) -> float:
        return self._stream(kind).uniform(low, high)

    def job_fate(self, settings: SimSettings) -> JobFate:
        queue = self.uniform("timing", *spread_bounds(settings.queue_seconds))
        run = self.uniform("timing", *spread_bounds(settings.job_seconds))
        error = None
        if self.chance("outcome", settings.fail_rate):
            capacity = self.pick("outcome", settings.fail_capacity_share)
            error = CAPACITY_ERROR if capacity else CONTENT_POLICY_ERROR
            # Failures surface part-way through processing, as a provider error would.
            run *= 0.3
        return JobFate(queue_seconds=queue, run_seconds=run, error=error)


class TokenBucket:
    """A token bucket on an injected clock: ``rate`` tokens per second, ``capacity`` at most."""

    __slots__ = ("_clock", "_tokens", "_updated", "capacity", "rate")

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._updated = clock()

    def try_take(self) -> float:
        """Take one token. Returns 0.0 on success, else the seconds until one is available."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


def retry_after_seconds(wait: float) -> str:
    """A ``Retry-After`` header value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait)))


async def send_dropped(send: Send, *, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                       sent: int = 0) -> None:
    """Start a response announcing ``body`` in full, send its first ``sent`` bytes, then drop."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
    })
    if sent:
        await send({"type": "http.response.body", "body": body[:sent], "more_body": True})
    raise SimulatedDrop(
        f"simulated connection drop ({sent} of {len(body)} body bytes sent)"
    )
