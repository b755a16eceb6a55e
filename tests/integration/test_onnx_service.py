"""The service with SPLITSERVE_BACKEND=onnxruntime, on a real socket, driven by the device."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from device_client.local_service import LocalService
from device_client.runtime import DeviceRuntime
from shared import wire
from shared.bundle import load_bundle
from tests.helpers import make_frame
from tests.support.inference import infer_all

MODEL = "efficientnet_lite0"
MSGPACK = {"Content-Type": wire.CONTENT_TYPE}


@pytest.fixture(scope="module")
def onnx_service(bundle_dir: str) -> Iterator[LocalService]:
    env = {
        "SPLITSERVE_BACKEND": "onnxruntime",
        "SPLITSERVE_PROFILE_REPEATS": "1",
        "SPLITSERVE_MAX_BATCH_SIZE": "8",
        "SPLITSERVE_MAX_QUEUE_DELAY_MS": "50",
    }
    with LocalService(models=[MODEL], env=env) as service:
        yield service



def test_onnx_service_matches_local_torch_top1(
    onnx_service: LocalService,
    device_runtime: DeviceRuntime,
    photos: dict[str, Image.Image],
    local_top1: dict[str, int],
    bundle_dir: str,
) -> None:
    points = device_runtime.points
    splits = [points[0].name, points[len(points) // 2].name, points[-1].name, "cloud"]
    results = asyncio.run(infer_all(onnx_service.url, device_runtime, photos, splits))
    for (split, name), result in results.items():
        ran = "cloud" if split == "cloud" else "split"
        assert result.ran == ran and result.fallback is None, (split, name)
        assert result.top5[0].index == local_top1[name], (split, name)
    # It really ran ONNX Runtime, on the bundle it exported into the session's cache.
    assert "onnxruntime" in onnx_service.log_path.read_text()
    cached = [p for p in Path(bundle_dir).glob(f"{MODEL}-*") if p.is_dir()]  # not the .tar
    assert len(cached) == 1
    assert load_bundle(cached[0], model=MODEL).manifest.fingerprint == device_runtime.fingerprint


def test_onnx_service_batches_concurrent_requests(
    onnx_service: LocalService, device_runtime: DeviceRuntime
) -> None:
    split = device_runtime.points[5].name
    url = f"{onnx_service.url}/v2/models/{MODEL}/splits/{split}/infer"
    body = make_frame(device_runtime, split)

    async def burst(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return list(
                await asyncio.gather(
                    *(client.post(url, content=body, headers=MSGPACK) for _ in range(n))
                )
            )

    responses = asyncio.run(burst(16))
    assert all(r.status_code == 200 for r in responses), [r.status_code for r in responses]
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    assert all(1 <= s <= 8 for s in sizes)
    # The same frame answered alone or in a batch of 8 gets the same class.
    assert len({r.json()["top_k"][0][0]["index"] for r in responses}) == 1


def test_a_valid_cached_bundle_is_reused_not_exported(
    onnx_service: LocalService,
    device_runtime: DeviceRuntime,
    bundle_dir: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shared.export
    from cloud_server.bundles import service_bundle

    def no_export(*args: object, **kwargs: object) -> Path:
        raise AssertionError("exported again although a valid bundle was cached")

    monkeypatch.setattr(shared.export, "export_bundle", no_export)
    bundle = service_bundle(MODEL, device_runtime.fingerprint, root=bundle_dir)
    assert bundle.root == Path(bundle_dir) / f"{MODEL}-{device_runtime.fingerprint}"
