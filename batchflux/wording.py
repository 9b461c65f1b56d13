"""Words that belong to the interface in use: how a message names a setting the user can change.

A message that advises changing a setting must name it the way the caller can change it: the
library by its keyword argument (``allow_insecure=True``), the command line by its flag
(``--insecure-http``). The library speaks :data:`LIBRARY` unless told otherwise; the command
line passes :data:`COMMAND_LINE` down with the call. Nothing guesses from ``sys.argv``.

Pure values; imports nothing of batchflux's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["COMMAND_LINE", "LIBRARY", "Wording"]


@dataclass(frozen=True, slots=True)
class Wording:
    """How one interface spells each setting a message may advise changing.

    >>> LIBRARY.allow_insecure, COMMAND_LINE.allow_insecure
    ('allow_insecure=True', '--insecure-http')
    """

    #: permit a plain-http base URL on a host that is not loopback
    allow_insecure: str = "allow_insecure=True"
    #: accept result image URLs on one more host
    allow_download_host: str = "allowed_download_hosts=[HOST]"
    #: how a run setting is named (:class:`batchflux.models.RunOptions` field -> words);
    #: a setting not listed is named as the library names it
    settings: Mapping[str, str] = field(default_factory=dict)

    def setting(self, name: str) -> str:
        """How to name the run setting ``name`` (a ``RunOptions`` field) to the user."""
        return self.settings.get(name, f"RunOptions({name}=...)")

    def setting_to(self, name: str, value: object) -> str:
        """How to set the run setting ``name`` to ``value`` (``--limit 5``,
        ``RunOptions(limit=5)``; a flag without a value for ``True``)."""
        if name in self.settings:
            flag = self.settings[name]
            return flag if value is True else f"{flag} {value}"
        return f"RunOptions({name}={value!r})"


#: The library's words: keyword arguments (the default everywhere).
LIBRARY = Wording()
#: The command line's words: its flags.
COMMAND_LINE = Wording(
    allow_insecure="--insecure-http",
    allow_download_host="--allow-download-host HOST",
    settings=MappingProxyType({
        "out_dir": "--out", "concurrency": "-j", "max_inflight": "--max-inflight",
        "rpm": "--rpm", "retries": "--retries", "budget": "--budget",
        "max_items": "--max-items", "job_timeout": "--job-timeout", "limit": "--limit",
        "fill_budget": "--fill-budget", "reroll": "--reroll",
        "retry_failed": "--retry-failed", "verify": "--verify", "dataset": "--dataset",
        "max_failure_rate": "--max-failure-rate", "shard": "--shard",
        "webhook_url": "--webhook-url", "webhook_listen": "--webhook-listen",
        "cost_per_image": "run.cost_per_image (in the manifest)",
        "filename_template": "run.filename_template (in the manifest)",
    }))
