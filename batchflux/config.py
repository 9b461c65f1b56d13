"""One run configuration, resolved in one place, and where a run sends its requests.

Settings come in layers: the defaults, then a manifest's ``run:`` block, then the caller (the
command line, or the library's ``options=``). :func:`resolve_config` merges them once and
checks every value (ranges, choices, the file-name template) before anything is spent, so a
bad setting fails the same way whichever door it came in by. The result is a frozen
:class:`RunConfig` that the rest of the run only reads.

A :class:`Target` says where requests go: the built-in :class:`Simulator` (in-process, no
key, nothing paid) or the real :class:`Api` (base URL, key, TLS and download-host rules,
timeouts). The library never reads the environment; the command line builds an :class:`Api`
from ``APIFRAME_API_KEY`` / ``APIFRAME_BASE_URL`` / ``--api-key-file``.

>>> config = resolve_config(None, RunOptions(concurrency=8, out_dir="out/x"))
>>> config.jobs, config.out_dir.as_posix(), config.verify
(8, 'out/x', 'auto')
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

from .apiframe import DEFAULT_BASE_URL, Timeouts, Transport
from .errors import UsageError
from .expand import VAR_PREFIX
from .filenames import check_filename_template
from .models import DEFAULT_RUN_OPTIONS, JobSpec, RunOptions, WebhookRequest
from .shard import Shard, parse_shard
from .wording import LIBRARY, Wording

if TYPE_CHECKING:
    from .sim.settings import SimSettings

__all__ = [
    "DATASET_FORMATS",
    "DEFAULT_WEBHOOK_LISTEN",
    "Api",
    "RetryFailed",
    "RunConfig",
    "Simulator",
    "Target",
    "VerifyMode",
    "WebhookConfig",
    "parse_listen",
    "resolve_config",
]

RetryFailed = Literal["retryable", "all"]
VerifyMode = Literal["auto", "decode", "structure"]
DATASET_FORMATS = ("hf", "webdataset")
#: Where the webhook receiver listens unless told: this machine only (a proxy forwards to it).
DEFAULT_WEBHOOK_LISTEN = "127.0.0.1:8787"


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Webhook mode: ``url`` is the public address Apiframe POSTs job events to (through a
    reverse proxy, an ingress or a tunnel); the receiver listens on ``host:port`` and takes
    POST on the URL's ``path``."""

    url: str
    host: str
    port: int
    path: str

    @property
    def request(self) -> WebhookRequest:
        """The webhook fields each submit carries."""
        return WebhookRequest(self.url)

    @property
    def listen(self) -> str:
        """``HOST:PORT`` as the user writes it (an IPv6 host in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Every setting of one run, resolved and checked (build with :func:`resolve_config`).

    ``jobs`` is ``-j``: jobs in flight (submitted and not yet finished), the ceiling of the
    adaptive in-flight cap, unless ``max_inflight`` (an expert's hard ceiling) is lower.
    ``cost_per_image`` None means "ask the API's model catalogue". ``limit`` runs at most that
    many of the items still to do (the first ones, in manifest order); ``fill_budget`` runs as
    many of them as ``budget`` pays for; ``reroll`` (``"rejected"``) adds a new image for each
    item whose latest image was rejected in review (:mod:`batchflux.reroll`).

    >>> from batchflux import RunOptions, load_job, resolve_config
    >>> config = resolve_config(load_job("jobs/nightly.yaml"), RunOptions(concurrency=16))
    >>> config.jobs, config.budget, config.out_dir.as_posix()
    (16, 40.0, 'out/nightly')
    """

    out_dir: Path
    filename_template: str
    jobs: int
    max_inflight: int | None
    rpm: float | None
    retries: int
    budget: float | None
    max_items: int
    job_timeout: float
    cost_per_image: float | None
    retry_failed: RetryFailed | None = None
    fresh: bool = False
    verify: VerifyMode = "auto"
    max_failure_rate: float | None = None
    dataset: str | None = None
    shard: Shard | None = None
    limit: int | None = None
    fill_budget: bool = False
    webhook: WebhookConfig | None = None
    reroll: str | None = None

    @property
    def inflight_ceiling(self) -> int:
        """The most jobs in flight the run will ever have."""
        return min(self.jobs, self.max_inflight) if self.max_inflight else self.jobs


@dataclass(frozen=True, slots=True)
class Simulator:
    """The built-in Apiframe simulator, run in-process: no key, no network, nothing paid.

    ``settings`` replaces its defaults (a :class:`batchflux.sim.SimSettings`); ``job_seconds``
    sets how long its jobs take (default 2 s, so a first run is quick); ``credits`` its balance
    (default: enough that it never limits a trial).

    >>> from batchflux import RunOptions, Simulator, run_batch
    >>> quick = Simulator(job_seconds=0.1)       # jobs of 0.1 s instead of 2 s
    >>> result = run_batch("jobs/nightly.yaml", RunOptions(out_dir="out/quick"), target=quick)
    >>> result.simulated, result.summary["counts"]["ok"]
    (True, 12)
    """

    settings: SimSettings | None = None
    job_seconds: float | None = None
    credits: int | None = None


@dataclass(frozen=True, slots=True)
class Api:
    """The real Apiframe API (or anything that speaks it, e.g. ``batchflux sim serve``).

    The key travels only in ``X-API-Key`` and only to ``base_url``; a plain-http base URL is
    refused off loopback unless ``allow_insecure``; result images are fetched only from the
    API host, ``*.apiframe.ai`` over https and ``allowed_download_hosts``. ``transport``
    replaces httpx's (tests: ``httpx.ASGITransport``, ``httpx.MockTransport``).

    >>> from batchflux import Api, run_batch
    >>> api = Api("afk_example", base_url="http://127.0.0.1:8000")   # e.g. batchflux sim serve
    >>> api.base_url, "afk_example" in repr(api)
    ('http://127.0.0.1:8000', False)
    >>> run_batch("jobs/nightly.yaml", target=Api("afk_x", base_url="http://api.example.com"))
    Traceback (most recent call last):
    ...
    batchflux.errors.ConfigError: ...
    """

    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    allow_insecure: bool = False
    allowed_download_hosts: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    transport: Transport | None = field(default=None, repr=False)


Target = Simulator | Api


def resolve_config(spec: JobSpec | None, options: RunOptions | None = None, *,
                   wording: Wording = LIBRARY) -> RunConfig:
    """Defaults < the manifest's ``run:`` block < ``options``, merged and checked.

    Raises :class:`~batchflux.errors.UsageError` naming the setting (in ``wording``: a flag on
    the command line, an argument in the library) for any value out of range, an unknown
    choice, or a file-name template that cannot name every item's files apart.

    >>> from batchflux import RunOptions, load_job, resolve_config
    >>> spec = load_job("jobs/nightly.yaml")
    >>> resolve_config(spec).budget, resolve_config(spec, RunOptions(budget=5)).budget
    (40.0, 5)
    >>> resolve_config(spec, RunOptions(filename_template="{bogus}.{ext}"))
    Traceback (most recent call last):
    ...
    batchflux.errors.UsageError: ...
    """
    merged = DEFAULT_RUN_OPTIONS
    if spec is not None:
        merged = merged.merged(spec.options)
    if options is not None:
        merged = merged.merged(options)
    name = wording.setting
    _at_least(merged.concurrency, 1, name("concurrency"))
    _at_least(merged.max_inflight, 1, name("max_inflight"))
    _positive(merged.rpm, name("rpm"))
    _at_least(merged.retries, 0, name("retries"))
    _positive(merged.budget, name("budget"))
    _at_least(merged.max_items, 1, name("max_items"))
    _positive(merged.job_timeout, name("job_timeout"))
    _at_least(merged.cost_per_image, 0, name("cost_per_image"))
    _at_least(merged.limit, 1, name("limit"))
    if merged.fill_budget and merged.budget is None:
        raise UsageError(f"{name('fill_budget')} needs a budget ({name('budget')})")
    if merged.max_failure_rate is not None and not 0.0 <= merged.max_failure_rate <= 1.0:
        raise UsageError(f"{name('max_failure_rate')} must be between 0 and 1, "
                         f"got {merged.max_failure_rate!r}")
    retry_failed = _choice(merged.retry_failed, get_args(RetryFailed), name("retry_failed"))
    verify = _choice(merged.verify or "auto", get_args(VerifyMode), name("verify"))
    dataset = _choice(merged.dataset, DATASET_FORMATS, name("dataset"))
    shard = parse_shard(merged.shard) if merged.shard is not None else None
    webhook = _webhook(merged, name)
    template = merged.filename_template or str(DEFAULT_RUN_OPTIONS.filename_template)
    problem = check_filename_template(template, relative_only=False,
                                      variables=_variables(spec) if spec else None)
    if problem:
        raise UsageError(f"{name('filename_template')} {template!r}: {problem}")
    return RunConfig(
        out_dir=Path(merged.out_dir or "out"),
        filename_template=template,
        jobs=int(merged.concurrency or 1),
        max_inflight=merged.max_inflight,
        rpm=merged.rpm,
        retries=int(merged.retries if merged.retries is not None else 0),
        budget=merged.budget,
        max_items=int(merged.max_items or 1),
        job_timeout=float(merged.job_timeout or 600.0),
        cost_per_image=merged.cost_per_image,
        retry_failed=retry_failed,  # type: ignore[arg-type]
        fresh=bool(merged.fresh),
        verify=verify,  # type: ignore[arg-type]
        max_failure_rate=merged.max_failure_rate,
        dataset=dataset,
        shard=shard,
        limit=merged.limit,
        fill_budget=bool(merged.fill_budget),
        webhook=webhook,
        reroll=_choice(merged.reroll, ("rejected",), name("reroll")),
    )


def _webhook(merged: RunOptions, name: Any) -> WebhookConfig | None:
    """Webhook mode's settings, checked: an http(s) URL with a host, a ``HOST:PORT``."""
    if merged.webhook_url is None:
        if merged.webhook_listen is not None:
            raise UsageError(f"{name('webhook_listen')} needs {name('webhook_url')} (the public "
                             "URL Apiframe sends job events to)")
        return None
    url = merged.webhook_url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise UsageError(f"{name('webhook_url')} {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{name('webhook_url')} must be an http(s) URL with a host, "
                         f"got {url!r}")
    if parts.username or parts.password or parts.fragment or "{" in parts.path \
            or "}" in parts.path:
        raise UsageError(f"{name('webhook_url')} must not carry credentials, a fragment or "
                         f"braces, got {url!r}")
    host, port = parse_listen(merged.webhook_listen or DEFAULT_WEBHOOK_LISTEN,
                              setting=name("webhook_listen"))
    return WebhookConfig(url=url, host=host, port=port, path=parts.path or "/")


def parse_listen(text: str, *, setting: str = "webhook_listen") -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[::1]:8787`` for IPv6). Raises
    :class:`~batchflux.errors.UsageError` naming ``setting``.

    >>> parse_listen("0.0.0.0:9000"), parse_listen("[::1]:8787")
    (('0.0.0.0', 9000), ('::1', 8787))
    """
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif ":" in host:
        host = ""  # an IPv6 address needs brackets, or the port cannot be told apart
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"{setting} takes HOST:PORT (e.g. {DEFAULT_WEBHOOK_LISTEN}, "
                         f"0.0.0.0:8787 or [::1]:8787; port 1-65535), got {text!r}")
    return host, int(port_text)


def explicit_price(spec: JobSpec | None, options: RunOptions | None) -> bool:
    """True when the manifest or the caller set ``cost_per_image`` (not the default)."""
    return bool((options is not None and options.cost_per_image is not None)
                or (spec is not None and spec.options.cost_per_image is not None))


def _variables(spec: JobSpec) -> set[str]:
    """The template variables any prompt of ``spec`` uses (fixed or as an axis)."""
    names: set[str] = set()
    for entry in spec.entries:
        names.update(entry.vars)
        for axis in entry.axes:
            names.update(f[len(VAR_PREFIX):] for f in axis.fields if f.startswith(VAR_PREFIX))
    return names


def _at_least(value: float | None, minimum: float, name: str) -> None:
    if value is not None and (not math.isfinite(value) or value < minimum):
        raise UsageError(f"{name} must be at least {minimum:g}, got {value!r}")


def _positive(value: float | None, name: str) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise UsageError(f"{name} must be positive, got {value!r}")


def _choice(value: str | None, choices: Collection[str], name: str) -> str | None:
    if value is not None and value not in choices:
        raise UsageError(f"{name} takes {' or '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _option_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(RunOptions))


def options_from(values: dict[str, Any]) -> RunOptions:
    """RunOptions from a mapping that may hold other keys (they are ignored)."""
    return RunOptions(**{k: v for k, v in values.items() if k in _option_names()})
