"""The real device client against the real service on loopback, at every split point."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from PIL import Image

from device_client.client import ServiceClient
from device_client.local_service import LocalService
from device_client.pipeline import Device
from device_client.runtime import DeviceRuntime
from tests.support.inference import infer_all


def test_every_split_point_matches_local_unsplit_top1(
    live_service: LocalService,
    device_runtime: DeviceRuntime,
    photos: dict[str, Image.Image],
    local_top1: dict[str, int],
) -> None:
    points = device_runtime.points
    results = asyncio.run(
        infer_all(live_service.url, device_runtime, photos, [p.name for p in points])
    )
    mismatches = []
    for point in points:
        for name in photos:
            result = results[(point.name, name)]
            assert result.ran == "split" and result.fallback is None  # type: ignore[attr-defined]
            assert result.split == point.name  # type: ignore[attr-defined]
            if result.top5[0].index != local_top1[name]:  # type: ignore[attr-defined]
                mismatches.append((point.name, name))
            # Only compressed int8 crosses: at most 30% of the float32 activation.
            assert result.bytes_sent <= 0.30 * point.float32_bytes, (  # type: ignore[attr-defined]
                point.name,
                result.bytes_sent,
            )  # type: ignore[attr-defined]
    assert not mismatches


@pytest.mark.parametrize("split", ["cloud", "device"], ids=["cloud", "device"])
def test_cloud_and_device_candidates(
    live_service: LocalService,
    device_runtime: DeviceRuntime,
    photos: dict[str, Image.Image],
    local_top1: dict[str, int],
    split: str,
) -> None:
    results = asyncio.run(infer_all(live_service.url, device_runtime, photos, [split]))
    for name in photos:
        result = results[(split, name)]
        assert result.ran == split  # type: ignore[attr-defined]
        assert result.top5[0].index == local_top1[name]  # type: ignore[attr-defined]
        if split == "device":
            assert result.bytes_sent == 0  # type: ignore[attr-defined]
        else:  # a JPEG of the 224x224 crop, far smaller than the float32 input
            assert 0 < result.bytes_sent < 3 * 224 * 224  # type: ignore[attr-defined]


def test_split_by_index_and_one_connection_for_many_images(
    live_service: LocalService, device_runtime: DeviceRuntime, photos: dict[str, Image.Image]
) -> None:
    point = device_runtime.points[7]

    async def run() -> int:
        async with ServiceClient(live_service.url) as client:
            device = Device(device_runtime, client, fallback=False)
            for name, image in photos.items():
                result = await device.infer(image, split=str(point.index), name=name)
                assert result.split == point.name
            # httpcore's pool (private, but the only witness): every image went over one
            # kept-alive connection.
            return len(client._http._transport._pool.connections)  # type: ignore[attr-defined]

    assert asyncio.run(run()) == 1


def test_metadata_lists_split_points(
    live_service: LocalService, device_runtime: DeviceRuntime
) -> None:
    meta = httpx.get(f"{live_service.url}/v2/models/efficientnet_lite0").json()
    assert meta["name"] == "efficientnet_lite0"
    assert meta["fingerprint"] == device_runtime.fingerprint
    assert meta["inputs"][0]["shape"] == [-1, 3, 224, 224]
    assert [p["name"] for p in meta["split_points"]] == [p.name for p in device_runtime.points]
    first = meta["split_points"][0]
    assert set(first) >= {"name", "index", "tensors", "float32_bytes"}
    assert first["tensors"][0]["shape"][0] == -1 and first["tensors"][0]["dtype"] == "float32"
