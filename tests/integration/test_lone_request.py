"""Over a real socket: a lone request on an idle service runs without sitting out the batch fill
delay (nothing else is on its way to join it), while a concurrent burst still batches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from device_client.local_service import LocalService
from device_client.runtime import DeviceRuntime
from shared import wire
from shared.preprocess import encode_jpeg, reference_photo
from tests.helpers import make_frame

MODEL = "efficientnet_lite0"
DELAY_MS = 10_000  # the longest fill delay the settings take


@pytest.fixture(scope="module")
def patient_service() -> Iterator[LocalService]:
    env = {"SPLITSERVE_PROFILE_REPEATS": "0", "SPLITSERVE_MAX_BATCH_SIZE": "4",
           "SPLITSERVE_MAX_QUEUE_DELAY_MS": str(DELAY_MS)}
    with LocalService(models=[MODEL], env=env) as service:
        yield service


def test_lone_requests_are_answered_without_the_fill_delay(
        patient_service: LocalService, device_runtime: DeviceRuntime) -> None:
    split = device_runtime.points[5].name
    with httpx.Client(base_url=patient_service.url, timeout=3 * DELAY_MS / 1e3) as client:
        bodies = [
            client.post(f"/v2/models/{MODEL}/classify", content=encode_jpeg(reference_photo()),
                        headers={"Content-Type": "image/jpeg"}),
            client.post(f"/v2/models/{MODEL}/splits/{split}/infer",
                        content=make_frame(device_runtime, split),
                        headers={"Content-Type": wire.CONTENT_TYPE}),
        ]
    for r in bodies:
        assert r.status_code == 200, r.text
        assert r.json()["batch_size"] == 1
        assert r.json()["timings_ms"]["queue"] < DELAY_MS / 2


def test_a_burst_still_shares_forward_passes(patient_service: LocalService,
                                             device_runtime: DeviceRuntime) -> None:
    split = device_runtime.points[5].name
    frame = make_frame(device_runtime, split)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=patient_service.url, timeout=3 * DELAY_MS / 1e3,
                                     limits=limits) as client:
            return list(await asyncio.gather(*(
                client.post(f"/v2/models/{MODEL}/splits/{split}/infer", content=frame,
                            headers={"Content-Type": wire.CONTENT_TYPE}) for _ in range(8))))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1 and all(s <= 4 for s in sizes), sizes
