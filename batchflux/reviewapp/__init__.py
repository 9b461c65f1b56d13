"""``batchflux review``: a local web app to accept, reject and star the images of a run.

- :mod:`.decisions`: ``OUT/review.jsonl``, the decisions as data (no web imports; exports
  and reports read it with :func:`read_decisions`).
- :mod:`.app`: the starlette app over one run directory (:func:`create_app`).
- :mod:`.serve`: the command, uvicorn on a loopback port (:func:`review_command`).
- ``static/``: the page, its script and style, shipped in the package (works offline).

The web parts are imported on first use, so reading decisions stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .decisions import (
    REVIEW_NAME,
    STATES,
    Decision,
    DecisionKind,
    append_decision,
    count_states,
    read_decisions,
    review_state,
)

__all__ = [
    "REVIEW_NAME",
    "STATES",
    "Decision",
    "DecisionKind",
    "append_decision",
    "count_states",
    "create_app",
    "read_decisions",
    "review_command",
    "review_state",
]

_LAZY = {"create_app": ".app", "review_command": ".serve"}

if TYPE_CHECKING:  # pragma: no cover
    from .app import create_app
    from .serve import review_command


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
