"""Text for people: how an item is named in log lines, and user text made safe for a terminal.

Pure functions over values; no I/O; of batchflux's own, only the values of models.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from .models import Result, WorkItem

__all__ = ["escape_controls", "item_label", "plural"]

#: Unicode categories that move the cursor, reorder or hide text on a terminal: control
#: characters (Cc: newline, escape...), format characters (Cf: U+202E right-to-left override,
#: zero-width spaces...) and the line and paragraph separators (Zl, Zp).
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp"})
_VALUE_WIDTH = 40


def escape_controls(text: str) -> str:
    r"""``text`` with every control or format character written as an escape (``\u202e``),
    so user text cannot reorder, hide or restyle what a terminal shows.

    >>> escape_controls("abc\u202edef\tx\x1b[31m")
    'abc\\u202edef\\u0009x\\u001b[31m'
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _INVISIBLE:
            code = ord(ch)
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def plural(count: float, noun: str, plural_noun: str | None = None) -> str:
    """``count`` with ``noun``, singular for exactly one (``plural_noun``, else ``noun`` + s,
    for every other count). Integers get thousands separators.

    >>> plural(1, "item"), plural(0, "item"), plural(1500, "image"), plural(2.5, "credit")
    ('1 item', '0 items', '1,500 images', '2.5 credits')
    >>> plural(1, "entry", "entries"), plural(3, "entry", "entries")
    ('1 entry', '3 entries')
    """
    number = f"{count:,}" if isinstance(count, int) else f"{count:,.10g}"
    word = noun if count == 1 else (plural_noun or noun + "s")
    return f"{number} {word}"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


def item_label(item: Result | WorkItem) -> str:
    """How log lines name an item (its result line, or the work item itself): what tells it
    apart from its neighbours in the grid. The prompt id, the aspect ratio (or the custom
    size), the template variables when it has any, the seed, and the first 12 hex digits of the
    key (which tell apart even items that differ only in another param).

    >>> item_label(WorkItem(index=0, key="3fa9c2e1b0d4" + "0" * 52, prompt_id="mug",
    ...                     prompt="a mug", params={"aspect_ratio": "16:9", "seed": 7},
    ...                     vars={"bg": "oak"}))
    'mug 16:9 bg=oak seed 7 [3fa9c2e1b0d4]'
    >>> item_label(WorkItem(index=1, key="", prompt_id="p017", prompt="a fox",
    ...                     params={"aspect_ratio": "custom", "width": 1024, "height": 768,
    ...                             "seed": 1}))
    'p017 custom 1024x768 seed 1'
    """
    params = item.params
    parts = [item.prompt_id or "?"]
    aspect = params.get("aspect_ratio")
    if aspect == "custom":
        parts.append(f"custom {params.get('width', '?')}x{params.get('height', '?')}")
    elif aspect is not None:
        parts.append(str(aspect))
    parts += [f"{name}={_short(value)}" for name, value in item.vars.items()]
    parts.append(f"seed {item.seed}")
    if item.key:
        parts.append(f"[{item.key[:12]}]")
    return escape_controls(" ".join(parts))
