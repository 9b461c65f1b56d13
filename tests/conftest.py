"""Shared fixtures. Simulator fixtures first; add other groups below in their own section."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from batchflux.sim import SimSettings, create_app, serve_in_thread

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

DATA = Path(__file__).parent / "data"
API_KEY = "afk_test_key_0001"

# ---------------------------------------------------------------------------------------------
# Simulator


@pytest.fixture
def sim_settings() -> SimSettings:
    """Fast defaults: jobs take a few tenths of a second, images render flat."""
    return SimSettings(job_seconds=0.3, queue_seconds=0.05, render_mode="fast",
                       webhook_backoff=0.05, webhook_tick=0.02)


@pytest.fixture
def sim_server(sim_settings: SimSettings) -> Iterator[str]:
    """Base URL of a real uvicorn simulator on a free loopback port."""
    with serve_in_thread(sim_settings) as base_url:
        yield base_url


@pytest.fixture
def sim_app(sim_settings: SimSettings) -> Any:
    """An in-process simulator app (use with ``httpx.ASGITransport``)."""
    return create_app(sim_settings)


@asynccontextmanager
async def sim_client(
    settings: SimSettings, *, mode: str = "inprocess", api_key: str | None = API_KEY, **app_kw: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` on a fresh simulator, in-process or over loopback uvicorn.

    The app is at ``client.sim_app`` (its world at ``client.sim_app.state.sim``).
    """
    app = create_app(settings, **app_kw)
    headers = {"X-API-Key": api_key} if api_key else {}
    if mode == "inprocess":
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://sim.local", headers=headers) as client:
            client.sim_app = app  # type: ignore[attr-defined]
            yield client
    else:
        with serve_in_thread(app=app) as base_url:
            async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
                client.sim_app = app  # type: ignore[attr-defined]
                yield client


@pytest.fixture(params=["inprocess", "uvicorn"])
def sim_mode(request: pytest.FixtureRequest) -> str:
    """Runs a test once in-process and once over real HTTP on loopback."""
    return str(request.param)


# ---------------------------------------------------------------------------------------------
# OpenAPI component schemas


@pytest.fixture(scope="session")
def openapi() -> dict[str, Any]:
    return json.loads((DATA / "openapi.json").read_text())


class OasValidator:
    """Validates JSON against ``#/components/schemas/<Name>`` of tests/data/openapi.json."""

    URI = "urn:apiframe:openapi"

    def __init__(self, document: dict[str, Any]) -> None:
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry: Registry = Registry().with_resource(self.URI, resource)

    def check(self, name: str, instance: Any) -> None:
        schema = {"$ref": f"{self.URI}#/components/schemas/{name}"}
        jsonschema.Draft202012Validator(
            schema, registry=self.registry, format_checker=jsonschema.FormatChecker()
        ).validate(instance)


@pytest.fixture(scope="session")
def oas(openapi: dict[str, Any]) -> OasValidator:
    return OasValidator(openapi)


# ---------------------------------------------------------------------------------------------
# Browser: playwright driving Debian's chromium
#
# Playwright never downloads a browser here: it launches the system's chromium (the Debian
# package, installed by .ci/run) by path. A browser test that cannot run fails; it never skips.

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")
VIEWPORT = {"width": 1400, "height": 900}


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The system chromium; the test fails (not skips) without it."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is not installed, and browser tests do not skip: "
                    "install it with `apt-get install -y chromium` (.ci/run does)",
                    pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser_context(chromium_path: str,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """A chromium context at a 1,400 x 900 viewport, with a fresh profile directory."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: it is in the test extras "
                    "(pip install -e '.[test]')", pytrace=False)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_path, headless=True,
            args=list(CHROMIUM_FLAGS), viewport=VIEWPORT, device_scale_factor=1,
            locale="en-GB", timezone_id="UTC", color_scheme="dark")
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context: BrowserContext) -> Iterator[Page]:
    """A new tab in :func:`browser_context`; JavaScript errors on it fail the test."""
    tab = browser_context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        tab.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
