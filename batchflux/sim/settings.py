"""``SimSettings``: every knob of the simulator, as one frozen value with named defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

#: A duration in seconds: a mean (the simulator draws uniformly from 0.5x to 1.5x of it), or an
#: explicit uniform spread ``(low, high)``.
Spread = float | tuple[float, float]

RenderMode = Literal["full", "fast"]

DAY = 24 * 3600.0


@dataclass(frozen=True, kw_only=True, slots=True)
class SimSettings:
    """How the simulated Apiframe behaves. Change one with ``dataclasses.replace``.

    Rates are probabilities in ``[0, 1]`` decided per request by the fault RNG, which is seeded
    with ``fault_seed`` so that a chaos run is repeatable (``None`` seeds it from the OS).
    """

    # Job timing
    job_seconds: Spread = 10.0
    queue_seconds: Spread = 1.0
    progress_steps: int = 20

    # Limits (per API key); None disables the limit
    rps: float | None = None
    burst: int | None = None  # token bucket size; default max(1, ceil(rps))
    max_inflight: int | None = None

    # Faults
    error_rate: float = 0.0  # 500/503 on /v2/ requests, before any side effect
    drop_rate: float = 0.0  # connection dropped mid-response on /v2/ requests
    drop_after_create_share: float = 0.5  # share of submit drops that happen after job creation
    fail_rate: float = 0.0  # jobs that end FAILED
    fail_capacity_share: float = 0.5  # of those, "No available capacity" (rest: content policy)
    truncate_rate: float = 0.0  # image downloads cut short (connection dropped)
    corrupt_rate: float = 0.0  # image downloads complete on the wire but do not decode
    download_bytes_per_second: float | None = None  # slow downloads; None = full speed
    stall_rate: float = 0.0  # submit/poll answers held back (after any side effect)...
    stall_seconds: float = 0.0  # ...this long: provokes client read timeouts
    storm_seconds: float = 0.0  # a 429 storm: every submit this long after the first is 429
    storm_retry_after: int = 5  # the Retry-After (seconds) sent during a storm
    fault_seed: int | None = 0

    # Money
    credits: int = 1000
    cost_per_image: int = 2

    # Retention
    asset_ttl: float = DAY
    upload_ttl: float = 1.5 * 3600
    idempotency_ttl: float = DAY

    # Keys: empty api_keys accepts any key starting with "afk_"
    api_keys: tuple[str, ...] = ()
    inactive_keys: tuple[str, ...] = ()

    # Images
    render_mode: RenderMode = "full"
    render_cache_size: int = 64

    # Uploads
    max_upload_bytes: int = 25 * 1024 * 1024
    max_video_upload_bytes: int = 50 * 1024 * 1024

    # Webhooks
    webhook_timeout: float = 10.0
    webhook_retries: int = 3  # attempts after the first
    webhook_backoff: float = 1.0  # seconds before the first retry, doubled each time
    webhook_tick: float = 0.05  # how often the sender looks for due events
    # Webhook faults, drawn per event from the fault RNG:
    webhook_drop_rate: float = 0.0  # lost on the way: never arrives (the sender thinks it did)
    webhook_dup_rate: float = 0.0  # arrives twice (the copy webhook_backoff after the first)
    webhook_delay: Spread = 0.0  # seconds an event waits before its first attempt

    def __post_init__(self) -> None:
        problems = []
        for name in ("error_rate", "drop_rate", "drop_after_create_share", "fail_rate",
                     "fail_capacity_share", "truncate_rate", "corrupt_rate", "stall_rate",
                     "webhook_drop_rate", "webhook_dup_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name} must be between 0 and 1, got {value!r}")
        for name in ("job_seconds", "queue_seconds", "webhook_delay"):
            low, high = spread_bounds(getattr(self, name))
            if low < 0 or high < low:
                problems.append(f"{name} must be >= 0 (and low <= high)")
        if self.render_mode not in ("full", "fast"):
            problems.append(f"render_mode must be 'full' or 'fast', got {self.render_mode!r}")
        if self.rps is not None and self.rps <= 0:
            problems.append("rps must be > 0")
        if self.max_inflight is not None and self.max_inflight < 1:
            problems.append("max_inflight must be >= 1")
        if self.stall_seconds < 0 or self.storm_seconds < 0 or self.storm_retry_after < 0:
            problems.append("stall_seconds, storm_seconds and storm_retry_after must be >= 0")
        if self.progress_steps < 1:
            problems.append("progress_steps must be >= 1")
        if self.credits < 0 or self.cost_per_image < 0:
            problems.append("credits and cost_per_image must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def is_known_key(self, api_key: str) -> bool:
        """True when ``api_key`` exists (active or not)."""
        if api_key in self.inactive_keys:
            return True
        if self.api_keys:
            return api_key in self.api_keys
        return api_key.startswith("afk_") and len(api_key) > 4


def spread_bounds(value: Spread) -> tuple[float, float]:
    """``(low, high)`` of a duration setting: a mean m spreads over ``[0.5 m, 1.5 m]``."""
    if isinstance(value, (tuple, list)):
        low, high = value
        return float(low), float(high)
    return 0.5 * float(value), 1.5 * float(value)


def parse_spread(text: str) -> Spread:
    """Parse ``"10"`` (mean) or ``"5-15"`` (uniform spread) as given on the command line."""
    if "-" in text.strip().lstrip("-"):
        low, _, high = text.partition("-")
        return (float(low), float(high))
    return float(text)


def settings_with(settings: SimSettings, patch: Mapping[str, Any]) -> SimSettings:
    """``settings`` with the fields in ``patch`` replaced (JSON-friendly: lists become tuples).

    Raises ``ValueError`` naming unknown fields or invalid values.
    """
    known = {f.name: f for f in fields(SimSettings)}
    unknown = sorted(set(patch) - set(known))
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    changes: dict[str, Any] = {}
    for name, value in patch.items():
        if isinstance(value, list):
            value = tuple(value)
        if name in ("job_seconds", "queue_seconds", "webhook_delay") and isinstance(value, str):
            value = parse_spread(value)
        changes[name] = value
    try:
        return replace(settings, **changes)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


def settings_to_json(settings: SimSettings) -> dict[str, Any]:
    """The settings as a JSON object (tuples become lists)."""
    return {
        f.name: (list(v) if isinstance(v := getattr(settings, f.name), tuple) else v)
        for f in dataclasses.fields(settings)
    }
