"""Issue 10: progress and log lines name what tells two items apart (aspect ratio or custom
size, template variables, seed), not just "failed p017 seed 1"."""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console

from batchflux.display import item_label
from batchflux.models import ErrorCategory, ErrorInfo, Result
from batchflux.progress import JsonReporter, LogReporter, RichReporter


def failed(aspect: str, bg: str | None = None, **params: Any) -> Result:
    """A failed item's record, as the runner hands it to reporters."""
    return Result(key=(aspect + (bg or "")).encode().hex().ljust(64, "0")[:64], index=0,
                  prompt_id="p017", status="failed", model="flux-2-dev", prompt="a mug",
                  seed=1, params={"aspect_ratio": aspect, "seed": 1, **params},
                  vars={"bg": bg} if bg else {},
                  error=ErrorInfo(ErrorCategory.GENERATION_FAILED, "content policy", False))


# Items of one prompt and one seed that differ in one axis each.
TWINS = [failed("1:1"), failed("16:9"), failed("custom", width=1024, height=768),
         failed("1:1", bg="oak"), failed("1:1", bg="white studio")]


def test_item_labels_tell_apart_items_of_one_prompt_and_seed() -> None:
    labels = [item_label(r) for r in TWINS]
    assert len(set(labels)) == len(labels)
    assert labels[0].startswith("p017 1:1 seed 1 [")
    assert labels[1].startswith("p017 16:9 seed 1 [")
    assert labels[2].startswith("p017 custom 1024x768 seed 1 [")
    assert labels[3].startswith("p017 1:1 bg=oak seed 1 [")
    assert labels[4].startswith("p017 1:1 bg=white studio seed 1 [")


def test_item_labels_escape_control_characters_and_cut_long_values() -> None:
    label = item_label(failed("1:1", bg="\u202eevil" + "x" * 100))
    assert "\u202e" not in label and "\\u202eevil" in label and "…" in label


def test_every_reporter_names_the_item_by_its_label() -> None:
    stream = io.StringIO()
    log = LogReporter(stream=stream, interval=10.0)
    events = io.StringIO()
    as_json = JsonReporter(stream=events)
    screen = io.StringIO()
    rich = RichReporter(console=Console(file=screen, force_terminal=False, width=200))
    for record in TWINS:
        log.result(record)
        as_json.result(record)
        rich.result(record)
    lines = stream.getvalue().splitlines()
    shown = screen.getvalue().splitlines()
    items = [json.loads(line) for line in events.getvalue().splitlines()]
    for n, record in enumerate(TWINS):
        label = item_label(record)
        assert lines[n].endswith(f"batchflux: failed {label}: generation_failed: content policy")
        assert shown[n] == f"failed {label}: generation_failed: content policy"
        assert items[n]["label"] == label
