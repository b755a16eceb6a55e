"""Load-aware planning over real sockets: a busy real service reports its load in its answers and
metadata and the device client parses it; a 503 with Retry-After keeps auto on the device until
it has passed."""

from __future__ import annotations

import asyncio
import threading

import httpx
from PIL import Image

from device_client.auto import AutoSplit
from device_client.client import ServiceClient
from device_client.local_service import LocalService
from device_client.pipeline import Device
from device_client.runtime import DeviceRuntime
from shared import wire
from shared.planner import CLOUD, DEVICE, DeviceCost, DeviceProfile, ServerProfile
from tests.helpers import make_frame
from tests.support.contract import metadata_body
from tests.support.fake_service import JsonService

MODEL = "efficientnet_lite0"
MSGPACK = {"Content-Type": wire.CONTENT_TYPE}


def test_a_busy_service_reports_its_load_and_the_device_parses_it(
        device_runtime: DeviceRuntime) -> None:
    split = device_runtime.points[0].name  # the costliest tail: the queue builds fast
    env = {"SPLITSERVE_PROFILE_REPEATS": "0", "SPLITSERVE_MAX_BATCH_SIZE": "1",
           "SPLITSERVE_MAX_QUEUE_DELAY_MS": "1", "SPLITSERVE_MAX_QUEUE": "256"}
    frame = make_frame(device_runtime, split)
    with LocalService(models=[MODEL], env=env) as service:
        url = f"{service.url}/v2/models/{MODEL}/splits/{split}/infer"
        stop, answers = threading.Event(), []

        def post() -> None:  # one client posting frames back to back
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    answers.append(http.post(url, content=frame, headers=MSGPACK).json())

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()

        async def device_side() -> tuple[list[float], list[float]]:
            async with ServiceClient(service.url) as client:
                replies, metas = [], []
                for _ in range(40):  # counted, not timed: until both saw a queue
                    reply = await client.infer_split(MODEL, split, frame)
                    assert reply.load is not None and client.last_load is reply.load
                    replies.append(reply.load.queue_ms_tail)
                    meta = await client.metadata(MODEL)
                    assert meta.load is not None and client.last_load is meta.load
                    metas.append(ServerProfile.from_metadata(meta).wait_ms(split))
                    if max(replies) > 0 and max(metas) > 0:
                        break
                return replies, metas

        try:
            replies, metas = asyncio.run(device_side())
        finally:
            stop.set()
            for t in threads:
                t.join()
        quiet = httpx.get(f"{service.url}/v2/models/{MODEL}").json()["load"]
    assert max(replies) > 0 and max(metas) > 0, (replies, metas)
    loads = [a["load"] for a in answers]
    assert sum(1 for load in loads if load["queued"] > 0) > 0
    # Every tail waits the shared queue; the whole model no less (it shares the one thread).
    assert all(load["queue_ms_whole"] >= load["queue_ms_tail"] for load in loads)
    assert quiet["queued"] == 0 and quiet["queue_ms_tail"] == 0  # drained: no load left


def test_a_503_with_retry_after_keeps_auto_on_the_device_until_it_passes(
        device_runtime: DeviceRuntime, photos: dict[str, Image.Image],
        local_top1: dict[str, int]) -> None:
    refuse = [True]

    def answer(method: str, path: str) -> tuple[int, object, dict[str, str]]:
        if method == "GET":
            return 200, metadata_body(model=MODEL, fingerprint=device_runtime.fingerprint,
                                      server_ms=5.0), {}
        if path.endswith("/probe"):
            return 200, {"received_bytes": 0, "server_ms": 0.0}, {}
        if refuse[0]:
            return 503, {"error": "queue full (256 requests waiting)"}, {"Retry-After": "2"}
        return 500, {"error": "no such thing in this fake"}, {}

    profile = DeviceProfile(device_runtime.name, device_runtime.fingerprint, (
        DeviceCost(DEVICE, 500.0, 0.0, 0), DeviceCost(CLOUD, 0.0, 1.0, 20_000)))
    now = [0.0]

    async def run(fake: JsonService) -> list[tuple[float, str, str | None]]:
        async with ServiceClient(fake.url) as client:
            auto = AutoSplit(client, profile, clock=lambda: now[0], seed=0)
            device = Device(device_runtime, client, auto=auto, timeout_s=10.0)
            seen = []
            for now[0] in (0.0, 0.5, 1.0, 1.9, 3.1):
                result = await device.infer(photos["coffee"], split="auto")
                assert result.top5[0].index == local_top1["coffee"]
                seen.append((now[0], result.split, result.fallback))
            return seen

    with JsonService(answer) as fake:
        seen = asyncio.run(run(fake))
        posts = [path for method, path in fake.requests if path.endswith("/classify")]
    first, *refused, last = seen
    assert first[1] == CLOUD and first[2] is not None and first[2].startswith("overloaded")
    # Until Retry-After (2 s, stretched by at most half) has passed: the device, nothing sent.
    assert all(split == DEVICE and (fallback or "").startswith("overloaded")
               for _, split, fallback in refused), refused
    assert last[1] == CLOUD  # then it tries the service again
    assert len(posts) == 2
