"""The review app over one run directory: a starlette ASGI app, a JSON API and static assets.

::

    GET  /                      the page (static/index.html); views by URL fragment:
                                #sheet, #grid-seed, #grid-aspect, #compare/<group number>
    GET  /static/<name>         the page's own script and style (shipped in the package)
    GET  /api/run               the run: groups (params once each), items (a reroll right
                                after its original), decisions
    GET  /api/decisions         the current decision of each decided item
    POST /api/decisions         {"key", "decision", "note"?}: one line appended to review.jsonl
    GET  /thumbs/<key>/<n>      thumbnail of image n of an item (made once, cached in OUT)
    GET  /files/<path>          a full image the run's results list, nothing else

It shows the items of the run's current manifest (:func:`~batchflux.results.split_by_manifest`)
and counts the others as not in the manifest; with ``include_all`` (``batchflux review
--all``) it shows every item, those not in the manifest marked (``"stale": true``). Hidden
items cannot be decided on and their files are not served.

It serves only the run's own files: a path must be listed in ``results.jsonl`` *and* resolve
(symlinks followed) inside the run directory, else 404. On a loopback address it also refuses
other ``Host`` names (DNS rebinding) and decisions posted from another origin.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import UsageError
from ..models import Result
from ..results import ManifestSplit, split_by_manifest
from ..review import (
    AXES,
    DEFAULT_THUMB_SIZE,
    axis_value,
    axis_values,
    format_value,
    image_label,
    make_thumbnail,
    manifest_note,
    prompt_groups,
    reroll_label,
    thumb_path,
    varying_params,
)
from ..store import RESULTS_NAME, item_keys_path
from .decisions import MAX_NOTE, DecisionKind, append_decision, read_decisions

__all__ = ["create_app", "load_records"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
_ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "app.css": "text/css; charset=utf-8"}


def load_records(out: Path) -> ManifestSplit:
    """Every item of the run (its result that counts), in manifest order, split into the
    items of the current manifest and the others.

    The one place the app reads ``results.jsonl``.
    """
    return split_by_manifest(out)


def _is_ok(record: Result) -> bool:
    return record.ok and bool(record.files)


def _error_json(record: Result) -> dict[str, str]:
    """Why an item has no image, as the page shows it."""
    if record.error is None:
        return {"category": "missing image", "message": "no image recorded for this item",
                "explanation": ""}
    return {"category": record.error.category.value,
            "message": record.error.message or "no image recorded for this item",
            "explanation": record.error.category.explanation}


@dataclass(frozen=True, slots=True)
class _Run:
    """What the app knows of the run, rebuilt when results.jsonl changes."""

    records: dict[str, Result]  # by key
    files: dict[str, str]  # relative path -> key, every image the results list
    payload: dict[str, Any]  # /api/run without the decisions


def _payload(out: Path, split: ManifestSplit, include_all: bool) -> dict[str, Any]:
    """``/api/run`` without the decisions: items in view order, each original's rerolls right
    after it and in its grid cells (``seed``, ``aspect``: the original's columns); the items
    of the current manifest, or with ``include_all`` every item, those not in it marked."""
    records = split.records(include_all=include_all)
    stale = split.stale_keys() if include_all else frozenset()
    groups = prompt_groups(records)
    by_key = {record.key: record for record in records}
    items = []
    for group in groups:
        for record in group.records:
            files = record.files
            items.append({
                "key": record.key,
                "group": group.number,
                "failed": not _is_ok(record),
                "label": image_label(record, files[0] if files else None),
                "reroll_of": record.reroll_of,
                "attempt": record.attempt,
                "reroll": reroll_label(record, by_key),
                "seed": axis_value(record, "seed", by_key),
                "aspect": axis_value(record, "aspect", by_key),
                "varying": [[k, format_value(v)] for k, v in varying_params(record, group)],
                "images": [
                    {"thumb": f"/thumbs/{record.key}/{n}",
                     "full": "/files/" + quote(f.path, safe="/"),
                     "width": f.width, "height": f.height}
                    for n, f in enumerate(files, start=1)
                ] if _is_ok(record) else [],
                "error": None if _is_ok(record) else _error_json(record),
                "stale": record.key in stale,
            })
    hidden = split.not_in_manifest
    return {
        "run": {"name": out.resolve().name, "path": str(out), "items": len(records),
                "not_in_manifest": hidden, "all": include_all,
                "note": manifest_note(hidden, include_all=include_all) if hidden else None},
        "axes": {axis: axis_values(records, axis, by_key) for axis in AXES},
        "groups": [{"number": g.number, "prompt_id": g.prompt_id, "prompt": g.prompt,
                    "common": [[k, format_value(v)] for k, v in g.common]} for g in groups],
        "items": items,
    }


class _RunView:
    """The run, re-read when results.jsonl or the record of the manifest's items changes (a
    resumed run adds items meanwhile; a run of an edited manifest changes which count)."""

    def __init__(self, out: Path, include_all: bool = False) -> None:
        self.out = out
        self.include_all = include_all
        self.root = out.resolve()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int | None] | None = None
        self._run: _Run | None = None

    def current(self) -> _Run:
        stat = (self.out / RESULTS_NAME).stat()
        try:  # a run of an edited manifest may add no result, only change its items
            keys: int | None = item_keys_path(self.out).stat().st_mtime_ns
        except FileNotFoundError:
            keys = None
        stamp = (stat.st_mtime_ns, stat.st_size, keys)
        with self._lock:
            if self._run is None or stamp != self._stamp:
                split = load_records(self.out)
                records = split.records(include_all=self.include_all)
                files = {f.path: r.key for r in records if _is_ok(r) for f in r.files}
                self._run = _Run({r.key: r for r in records}, files,
                                 _payload(self.out, split, self.include_all))
                self._stamp = stamp
            return self._run

    def inside(self, rel: str) -> Path | None:
        """``OUT/rel`` when it is a file inside the run directory (symlinks followed)."""
        try:
            path = (self.root / rel).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path


def host_name(host_header: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``, ``[::1]:8765`` -> ``[::1]``."""
    if host_header.startswith("["):
        return host_header.partition("]")[0] + "]"
    return host_header.rpartition(":")[0] if ":" in host_header else host_header


class _LoopbackHostsOnly:
    """Refuse requests whose ``Host`` is not a loopback name: a web page elsewhere cannot
    reach this app through a DNS name that resolves to 127.0.0.1 (DNS rebinding)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = host_name(Headers(scope=scope).get("host", ""))
            if host.lower() not in LOOPBACK_HOSTS:
                response = _error(400, f"this review app answers on loopback names only, "
                                       f"not {host!r}")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _decisions_json(out: Path) -> dict[str, Any]:
    return {key: d.to_json() for key, d in read_decisions(out).items()}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(out_dir: str | os.PathLike[str], *, loopback_only: bool = True,
               thumb_size: int = DEFAULT_THUMB_SIZE, include_all: bool = False) -> Starlette:
    """The review app over run directory ``out_dir`` (``UsageError`` if it is not one,
    ``RunDirectoryError`` if its record of the manifest's items is damaged).

    ``loopback_only`` (the default, for an app bound to a loopback address) refuses requests
    whose ``Host`` is not a loopback name. ``include_all`` shows the items the manifest no
    longer has too (marked), not only the manifest's.
    """
    out = Path(out_dir)
    view = _RunView(out, include_all)
    try:
        view.current()
    except FileNotFoundError:
        raise UsageError(f"{out} is not a batchflux run directory (no results.jsonl)") from None
    package = resources.files(__package__).joinpath("static")
    assets = {name: package.joinpath(name).read_bytes() for name in _ASSETS}

    async def page(request: Request) -> Response:
        return Response(assets["index.html"], media_type=_ASSETS["index.html"],
                        headers={"Cache-Control": "no-cache"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets or name == "index.html":
            return _error(404, "not found")
        return Response(assets[name], media_type=_ASSETS[name],
                        headers={"Cache-Control": "no-cache"})

    async def api_run(request: Request) -> Response:
        run = await anyio.to_thread.run_sync(view.current)
        decisions = await anyio.to_thread.run_sync(_decisions_json, out)
        return JSONResponse({**run.payload, "decisions": decisions})

    async def api_decisions(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(_decisions_json, out))

    async def decide(request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return _error(403, "decisions are taken from this app's own page only")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "send JSON (Content-Type: application/json)")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "send a JSON object: {\"key\": ..., \"decision\": ...}")
        key, decision, note = body.get("key"), body.get("decision"), body.get("note")
        run = await anyio.to_thread.run_sync(view.current)
        if not isinstance(key, str) or key not in run.records:
            return _error(400, f"{key!r} is not an item of this run")
        if not _is_ok(run.records[key]):
            return _error(400, f"item {key[:12]} failed: there is no image to decide on")
        if decision not in tuple(DecisionKind):
            return _error(400, "decision must be one of "
                          + ", ".join(d.value for d in DecisionKind))
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            return _error(400, f"note must be text of at most {MAX_NOTE} characters")
        made = await anyio.to_thread.run_sync(
            lambda: append_decision(out, key, decision, note=note))
        return JSONResponse(made.to_json())

    async def thumbnail(request: Request) -> Response:
        key, number = request.path_params["key"], request.path_params["number"]
        run = await anyio.to_thread.run_sync(view.current)
        record = run.records.get(key)
        if record is None or not _is_ok(record) or not 1 <= number <= len(record.files):
            return _error(404, "no such image")
        source = view.inside(record.files[number - 1].path)
        if source is None:
            return _error(404, "image missing")
        target = thumb_path(out, key, number)
        try:
            await anyio.to_thread.run_sync(
                lambda: make_thumbnail(source, target, size=thumb_size))
        except OSError:
            return _error(404, "the image cannot be read")
        return FileResponse(target, media_type="image/jpeg",
                            headers={"Cache-Control": "no-cache"})

    async def file(request: Request) -> Response:
        rel = request.path_params["path"]
        run = await anyio.to_thread.run_sync(view.current)
        path = view.inside(rel) if rel in run.files else None
        if path is None:
            return _error(404, "not a file of this run")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", page),
        Route("/static/{name}", static),
        Route("/api/run", api_run),
        Route("/api/decisions", api_decisions, methods=["GET"]),
        Route("/api/decisions", decide, methods=["POST"]),
        Route("/thumbs/{key}/{number:int}", thumbnail),
        Route("/files/{path:path}", file),
    ]
    middleware = [Middleware(_LoopbackHostsOnly)] if loopback_only else []
    return Starlette(routes=routes, middleware=middleware)
