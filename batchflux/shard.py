"""Split one manifest across N machines with no coordinator: ``--shard I/N``.

An item belongs to shard ``I`` of ``N`` when the first 64 bits of its key, read as an integer,
are ``I`` modulo ``N``. The rule is a pure function of the key, so every machine that expands
the same manifest agrees on the split without talking to the others, the shards partition the
items exactly, and a manifest that grows keeps every existing item in the shard it was in.

>>> shard = parse_shard("1/3")
>>> shard.label
'1/3'
>>> sum(parse_shard(f"{i}/3").contains("00000000000000ff" + "0" * 48) for i in range(3))
1

Shards are numbered from 0, like a Kubernetes Indexed Job's ``JOB_COMPLETION_INDEX`` and a
Slurm array's ``SLURM_ARRAY_TASK_ID`` (with ``--array=0-N``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import UsageError
from .models import WorkItem

__all__ = ["Shard", "filter_items", "parse_shard", "shard_of"]


def shard_of(key: str, count: int) -> int:
    """The shard (0 to ``count - 1``) that owns an item key."""
    if count < 1:
        raise ValueError("the shard count must be at least 1")
    return int(key[:16], 16) % count


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (``0 <= index < count``).

    >>> from batchflux import Shard, expand_job, load_job
    >>> items = list(expand_job(load_job("jobs/nightly.yaml")))
    >>> shards = [Shard(index, 3) for index in range(3)]
    >>> sum(len([i for i in items if shard.contains(i.key)]) for shard in shards), shards[1].label
    (12, '1/3')
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= I < N and N >= 1")

    @property
    def label(self) -> str:
        """``"I/N"``, as given on the command line and recorded in summary.json."""
        return f"{self.index}/{self.count}"

    def contains(self, key: str) -> bool:
        """True when the item with this key belongs to this shard."""
        return shard_of(key, self.count) == self.index


def parse_shard(text: str) -> Shard:
    """Parse ``"I/N"`` (0-based ``I``). Raises :class:`~batchflux.errors.UsageError`."""
    index_text, slash, count_text = text.strip().partition("/")
    try:
        if not slash:
            raise ValueError
        return Shard(int(index_text), int(count_text))
    except ValueError:
        raise UsageError(f"--shard takes I/N with 0 <= I < N (for example 0/4), "
                         f"got {text!r}") from None


def filter_items(items: Iterable[WorkItem], shard: Shard | None) -> Iterator[WorkItem]:
    """The items of ``shard``, lazily (memory stays flat); all of them when ``shard`` is None."""
    if shard is None:
        yield from items
        return
    for item in items:
        if shard.contains(item.key):
            yield item
