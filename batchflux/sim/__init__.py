"""A faithful, self-contained simulator of Apiframe's v2 image API.

>>> import httpx
>>> from batchflux.sim import SimSettings, create_app, serve_in_thread
>>> app = create_app(SimSettings(job_seconds=0.5))           # in-process (httpx.ASGITransport)
>>> with serve_in_thread(SimSettings()) as base_url:         # real uvicorn on loopback
...     httpx.get(f"{base_url}/v2/models", headers={"X-API-Key": "afk_x"}).status_code
200
>>> app = create_app(SimSettings(), state_dir="sim-state")   # a world that survives restarts
>>> app.close()

See ``docs/simulator.md`` for every setting, the stats fields and the fault model.
"""

from __future__ import annotations

from .app import create_app
from .persist import SimStateError
from .render import size_for
from .serve import serve_in_thread
from .settings import SimSettings
from .webhooks import sign as sign_webhook

__all__ = [
    "SimSettings",
    "SimStateError",
    "create_app",
    "serve_in_thread",
    "sign_webhook",
    "size_for",
]
