"""The start-up warm-up: it reaches every inference route, refused before the endpoint runs, so
it leaves nothing in the metrics; with API keys set it still gets past the auth middleware."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cloud_server.app import create_app
from cloud_server.runtime import ModelRuntime
from cloud_server.settings import Settings
from cloud_server.warmup import INFERENCE_PATHS, warm_up


def _no_models(name: str, weights: str | None) -> ModelRuntime:
    raise RuntimeError("no models in this test")


@pytest.mark.parametrize("keys", [(), ("k-one", "k-two")], ids=["open", "with-keys"])
def test_warm_up_reaches_each_route_and_counts_in_no_metric(keys: tuple[str, ...]) -> None:
    app = create_app(Settings(models=("efficientnet_lite0",), api_keys=keys),
                     loader=_no_models)

    async def run() -> tuple[list[int], str]:
        async with app.router.lifespan_context(app):  # the lifespan warms up once itself
            statuses = await warm_up(app, api_key=keys[0] if keys else None)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                metrics = (await client.get("/metrics")).text
        return statuses, metrics

    statuses, metrics = asyncio.run(run())
    assert statuses == [404] + [400] * len(INFERENCE_PATHS)
    assert "splitserve_requests_total{" not in metrics
    assert "splitserve_received_bytes_total{" not in metrics
    assert app.state.service.decoding == 0


def test_a_refused_warm_up_returns_its_statuses_and_does_not_raise() -> None:
    app = create_app(Settings(models=("efficientnet_lite0",), api_keys=("right",)),
                     loader=_no_models)
    statuses = asyncio.run(warm_up(app, api_key="wrong"))
    assert statuses == [403] * (1 + len(INFERENCE_PATHS))
