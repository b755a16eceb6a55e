"""Run the real device client over photos and split points against a live service."""

from __future__ import annotations

from PIL import Image

from device_client.client import ServiceClient
from device_client.pipeline import Device
from device_client.results import InferenceResult
from device_client.runtime import DeviceRuntime


async def infer_all(
    url: str, runtime: DeviceRuntime, photos: dict[str, Image.Image], splits: list[str]
) -> dict[tuple[str, str], InferenceResult]:
    """``{(split, photo name): result}`` with fallback off, so every answer is the service's."""
    results = {}
    async with ServiceClient(url) as client:
        device = Device(runtime, client, fallback=False)
        for split in splits:
            for name, image in photos.items():
                results[(split, name)] = await device.infer(image, split=split, name=name)
    return results
