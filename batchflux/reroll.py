"""Reroll: one new item for each rejected image, with the same prompt and params.

After a review (``batchflux review OUT`` writes ``OUT/review.jsonl``), ``batchflux run M
--reroll rejected`` adds, for each item of the manifest whose latest image is rejected, one
new item: the same prompt and params, and the next *derived* seed. An item's rerolls form a
chain (``attempt`` 1, 2, 3...) recorded on their result lines with ``reroll_of`` (the original
item's key); only the chain's latest member counts:

- the original rejected, no reroll yet: attempt 1 is added;
- attempt 1 made and not (yet) rejected: nothing new (it is done: the run skips it, so a
  second ``--reroll rejected`` pays nothing);
- attempt 1 rejected in turn: attempt 2 is added.

Seeds are derived from the original item's key and the attempt number, so the same reroll
asks for the same image every time and a resumed reroll is never paid twice. A reroll item's
key is the hash of its own request, like any item's; it joins its original through
``reroll_of``.

>>> from batchflux import expand_job, load_job
>>> spec = load_job("jobs/nightly.yaml")
>>> list(reroll_items(expand_job(spec), "out/nightly", image_hashes=spec.image_hashes,
...                   first_index=12))    # nothing rejected yet: nothing to reroll
[]
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .expand import MAX_SEED, request_key
from .models import FLUX_PARAM_NAMES, WorkItem
from .results import iter_records
from .reviewapp.decisions import read_decisions

__all__ = ["REROLL_MODES", "Chain", "reroll_items", "reroll_seed"]

#: What ``--reroll`` takes: the decision that earns an item a new image.
REROLL_MODES = ("rejected",)


def reroll_seed(original_key: str, attempt: int) -> int:
    """The seed of reroll ``attempt`` (1, 2, ...) of the item with ``original_key``."""
    digest = hashlib.sha256(f"batchflux-reroll:{original_key}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)


@dataclass(frozen=True, slots=True)
class Chain:
    """An original item's rerolls so far: ``latest`` is the key of its newest member (the
    original itself when it has none) and ``attempts`` how many rerolls were made."""

    latest: str
    attempts: int


def chains(out_dir: Path) -> dict[str, Chain]:
    """Each original key with rerolls, and its chain, from ``OUT/results.jsonl`` (lines that
    are not result records are passed over)."""
    found: dict[str, Chain] = {}
    for result in iter_records(out_dir, on_bad_line=lambda line: None):
        if result.reroll_of is None:
            continue
        known = found.get(result.reroll_of)
        if known is None or result.attempt > known.attempts:
            found[result.reroll_of] = Chain(result.key, result.attempt)
    return found


def reroll_item(item: WorkItem, attempt: int, *, index: int,
                image_hashes: Mapping[str, str]) -> WorkItem:
    """Reroll ``attempt`` of ``item``: its request with the next derived seed."""
    params = {**item.params, "seed": reroll_seed(item.key, attempt)}
    params = {name: params[name] for name in FLUX_PARAM_NAMES if name in params}
    key = request_key(item.model, item.prompt, params, image_hashes)
    return replace(item, index=index, key=key, params=params, reroll_of=item.key,
                   attempt=attempt)


def reroll_items(items: Iterable[WorkItem], out_dir: str | os.PathLike[str], *,
                 image_hashes: Mapping[str, str], first_index: int) -> Iterator[WorkItem]:
    """Every reroll item of ``items`` (the manifest's): the chains made so far, and one new
    attempt for each item whose latest member is rejected. Indexes count on from
    ``first_index`` (after the manifest's own items), in manifest order."""
    out = Path(out_dir)
    decisions = read_decisions(out)
    made = chains(out)
    index = first_index
    for item in items:
        chain = made.get(item.key, Chain(item.key, 0))
        for attempt in range(1, chain.attempts + 1):  # the rerolls already made: done
            yield reroll_item(item, attempt, index=index, image_hashes=image_hashes)
            index += 1
        decision = decisions.get(chain.latest)
        if decision is not None and decision.state == "rejected":
            yield reroll_item(item, chain.attempts + 1, index=index, image_hashes=image_hashes)
            index += 1
