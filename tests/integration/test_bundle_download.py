"""The live service hands its bundle out; the device fetches, checks and caches it, once.

Over real sockets: the service is ``python -m cloud_server`` (tests/conftest.py); the tampered
download comes from a small fake server (tests/support/bundles.py) serving the real archive with
one byte changed. The service's export (~10 s) happens once per session, in its bundle dir.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from device_client.bundles import ETAG_NAME, fetch_bundle
from device_client.client import ServiceClient
from device_client.local_service import LocalService
from device_client.onnx_runtime import OnnxDeviceRuntime
from shared.bundle import load_bundle
from shared.errors import BundleIntegrityError
from shared.models import get_spec
from shared.preprocess import center_crop, to_array
from tests.support.bundles import ArchiveService

pytestmark = pytest.mark.slow
MODEL = "efficientnet_lite0"


def _fetch(url: str, fingerprint: str, cache: Path) -> Path:
    async def go() -> Path:
        async with ServiceClient(url, timeout_s=60.0) as client:
            return await fetch_bundle(client, MODEL, fingerprint, root=cache, wait_s=600)

    return asyncio.run(go())


def _bundle_requests(service: LocalService) -> dict[str, float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    pattern = rf'splitserve_bundle_requests_total{{model="{MODEL}",status="(\d+)"}} (\S+)'
    return {status: float(n) for status, n in re.findall(pattern, text)}


@pytest.fixture(scope="module")
def fingerprint(live_service: LocalService) -> str:
    meta = httpx.get(f"{live_service.url}/v2/models/{MODEL}", timeout=10).json()
    return str(meta["fingerprint"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("device-cache")


@pytest.fixture(scope="module")
def fetched(live_service: LocalService, fingerprint: str, cache: Path) -> Path:
    return _fetch(live_service.url, fingerprint, cache)


def _top1(path: Path, image: Image.Image) -> int:
    rt = OnnxDeviceRuntime(path, threads=1)
    x = to_array(center_crop(image, get_spec(MODEL).preprocessing), rt.preprocessing)
    return int(np.argmax(rt.run_full(x)))


def test_the_device_fetches_checks_and_runs_the_services_bundle(
        fetched: Path, fingerprint: str, cache: Path, photos: dict[str, Image.Image],
        local_top1: dict[str, int]) -> None:
    assert fetched == cache / "bundles" / f"{MODEL}-{fingerprint}"
    bundle = load_bundle(fetched, model=MODEL, fingerprint=fingerprint)
    assert len(bundle.points) > 10 and (fetched / ETAG_NAME).is_file()
    assert _top1(fetched, photos["chelsea"]) == local_top1["chelsea"]


def test_a_second_fetch_is_a_304_and_downloads_nothing(
        live_service: LocalService, fetched: Path, fingerprint: str, cache: Path) -> None:
    before = _bundle_requests(live_service)
    mtime = (fetched / "weights.bin").stat().st_mtime_ns
    assert _fetch(live_service.url, fingerprint, cache) == fetched
    after = _bundle_requests(live_service)
    assert after.get("304", 0) == before.get("304", 0) + 1
    assert after.get("200", 0) == before.get("200", 0)
    assert (fetched / "weights.bin").stat().st_mtime_ns == mtime


def test_the_endpoint_over_http(live_service: LocalService, fetched: Path) -> None:
    url = f"{live_service.url}/v2/models/{MODEL}/bundle"
    etag = (fetched / ETAG_NAME).read_text()
    with httpx.stream("GET", url, timeout=60) as got:
        assert got.status_code == 200
        assert got.headers["content-type"] == "application/x-tar"
        assert got.headers["etag"] == etag and re.fullmatch(r'"[0-9a-f]{64}"', etag)
        size = sum(len(chunk) for chunk in got.iter_raw())
    assert int(got.headers["content-length"]) == size
    files = sum(p.stat().st_size for p in fetched.iterdir() if p.name != ETAG_NAME)
    assert files < size < files + 64 * 1024  # tar headers only: not compressed, nothing else
    same = httpx.get(url, headers={"If-None-Match": etag}, timeout=60)
    assert same.status_code == 304 and same.content == b""
    missing = httpx.get(f"{live_service.url}/v2/models/nope/bundle", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"].startswith("no model 'nope'")


def test_a_tampered_download_is_refused_and_the_cached_bundle_keeps_working(
        live_service: LocalService, fetched: Path, fingerprint: str, cache: Path,
        photos: dict[str, Image.Image], local_top1: dict[str, int]) -> None:
    archive = bytearray(httpx.get(f"{live_service.url}/v2/models/{MODEL}/bundle",
                                  timeout=60).content)
    archive[len(archive) // 2] ^= 0xFF  # inside weights.bin, the bulk of it
    with ArchiveService(bytes(archive), '"tampered"') as fake, \
            pytest.raises(BundleIntegrityError) as caught:
        _fetch(fake.url, fingerprint, cache)
    message = str(caught.value)
    assert "\n" not in message and "does not match its sha256" in message
    assert f"kept the cached bundle {fetched}" in message
    load_bundle(fetched, model=MODEL, fingerprint=fingerprint)
    assert _top1(fetched, photos["chelsea"]) == local_top1["chelsea"]
