"""GET /v2/models/{model}/bundle in-process: headers, 304, 404, 503 while exporting, API keys.

The service's real bundle takes an export; here the shelf hands out a tiny one (the live
service's own is fetched in tests/integration/test_bundle_download.py).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx

from cloud_server.app import create_app
from cloud_server.bundle_archive import Archive, build_archive
from cloud_server.routers.bundle import BundleShelf
from cloud_server.runtime import ModelRuntime
from cloud_server.settings import Settings
from shared.bundle import load_bundle
from shared.errors import ExportError
from tests.support.bundles import TINY_FINGERPRINT, TINY_MODEL, write_tiny_bundle


def _loader(name: str, weights: str | None) -> ModelRuntime:
    # The endpoint needs only the served weights' fingerprint from the runtime.
    return cast(ModelRuntime, SimpleNamespace(name=name, fingerprint=TINY_FINGERPRINT))


def _scenario(tmp_path: Path, settings: Settings, body: object) -> None:
    root = tmp_path / f"{TINY_MODEL}-{TINY_FINGERPRINT}"
    write_tiny_bundle(root)
    release = threading.Event()
    asked: list[tuple[str, str, str | None]] = []

    def prepare(model: str, fingerprint: str, weights: str | None) -> Archive:
        asked.append((model, fingerprint, weights))
        release.wait(10)
        return build_archive(load_bundle(root))

    async def go() -> None:
        app = create_app(settings, loader=_loader)
        app.state.bundle_shelf = BundleShelf(prepare, wait_s=0.2, retry_after_s=3)
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(app.state.service.wait_ready, 10)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                await body(client, release, asked)  # type: ignore[operator]

    asyncio.run(go())


async def _exchange(client: httpx.AsyncClient, release: threading.Event,
                    asked: list[tuple[str, str, str | None]]) -> None:
    url = f"/v2/models/{TINY_MODEL}/bundle"
    busy = await client.get(url)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "3"
    assert "being exported" in busy.json()["error"]
    release.set()
    for _ in range(50):
        got = await client.get(url)
        if got.status_code == 200:
            break
        await asyncio.sleep(0.1)
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/x-tar"
    assert int(got.headers["content-length"]) == len(got.content)
    etag = got.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) == 66
    assert asked == [(TINY_MODEL, TINY_FINGERPRINT, None)]  # prepared once for both requests
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        same = await client.get(url, headers={"If-None-Match": header})
        assert same.status_code == 304 and same.content == b"" and same.headers["etag"] == etag
    changed = await client.get(url, headers={"If-None-Match": '"an old one"'})
    assert changed.status_code == 200 and changed.content == got.content
    missing = await client.get("/v2/models/nope/bundle")
    assert missing.status_code == 404 and "no model 'nope'" in missing.json()["error"]
    metrics = (await client.get("/metrics")).text
    for status, count in (("200", 2), ("304", 4), ("503", 1)):
        line = f'splitserve_bundle_requests_total{{model="{TINY_MODEL}",status="{status}"}}'
        assert f"{line} {count}.0" in metrics, status


def test_the_bundle_is_served_with_a_strong_etag(tmp_path: Path) -> None:
    _scenario(tmp_path, Settings(models=(TINY_MODEL,)), _exchange)


async def _keyed(client: httpx.AsyncClient, release: threading.Event,
                 asked: list[tuple[str, str, str | None]]) -> None:
    release.set()
    url = f"/v2/models/{TINY_MODEL}/bundle"
    anonymous = await client.get(url)
    assert anonymous.status_code == 401 and "missing API key" in anonymous.json()["error"]
    wrong = await client.get(url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert asked == []  # refused before any work
    good = await client.get(url, headers={"Authorization": "Bearer sesame"})
    assert good.status_code == 200 and good.headers["etag"]


def test_the_bundle_needs_the_api_key_like_other_model_endpoints(tmp_path: Path) -> None:
    _scenario(tmp_path, Settings(models=(TINY_MODEL,), api_keys=("sesame",)),  # type: ignore[arg-type]
              _keyed)


def test_a_failed_export_is_reported_and_not_retried_at_every_poll(tmp_path: Path) -> None:
    calls: list[str] = []

    def broken(model: str, fingerprint: str, weights: str | None) -> Archive:
        calls.append(model)
        raise ExportError("head_003.onnx disagrees with torch")

    async def go() -> None:
        app = create_app(Settings(models=(TINY_MODEL,)), loader=_loader)
        app.state.bundle_shelf = BundleShelf(broken, wait_s=5)
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(app.state.service.wait_ready, 10)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for _ in range(3):
                    got = await client.get(f"/v2/models/{TINY_MODEL}/bundle")
                    assert got.status_code == 500
                    assert "head_003.onnx disagrees with torch" in got.json()["error"]

    asyncio.run(go())
    assert calls == [TINY_MODEL]
