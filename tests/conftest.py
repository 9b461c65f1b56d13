"""Shared fixtures. Simulator fixtures first; add other groups below in their own section."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from batchflux.sim import SimSettings, create_app, serve_in_thread

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
