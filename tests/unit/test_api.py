"""Fast API tests in-process (httpx.ASGITransport): statuses, error bodies, schemas, readiness."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
import torch

from cloud_server.app import create_app
from cloud_server.runtime import ModelRuntime, load_runtime
from cloud_server.settings import Settings
from device_client.runtime import DeviceRuntime
from shared import wire
from tests.helpers import make_frame

MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    return load_runtime(MODEL, profile_repeats=1)


@asynccontextmanager
async def serve(
    settings: Settings, loader: Callable[[str, str | None], ModelRuntime]
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, loader=loader)
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(app.state.service.wait_ready, 30)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_ready_is_503_while_loading_then_200(runtime: ModelRuntime) -> None:
    release = threading.Event()

    def slow_loader(name: str, weights: str | None) -> ModelRuntime:
        release.wait(10)
        return runtime

    async def scenario() -> None:
        app = create_app(Settings(models=(MODEL,)), loader=slow_loader)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.get("/v2/health/live")
                assert r.status_code == 200 and r.json() == {"live": True}  # no null fields
                r = await c.get("/v2/health/ready")
                assert r.status_code == 503 and r.headers["retry-after"]
                assert r.json() == {"ready": False, "error": "loading models"}
                r = await c.get(f"/v2/models/{MODEL}")
                assert r.status_code == 503 and "loading" in r.json()["error"]
                release.set()
                await asyncio.to_thread(app.state.service.wait_ready, 10)
                r = await c.get("/v2/health/ready")
                assert r.status_code == 200 and r.json() == {"ready": True}
                assert (await c.get(f"/v2/models/{MODEL}/ready")).json()["ready"] is True

    run(scenario())


def test_failed_load_is_reported_by_readiness(runtime: ModelRuntime) -> None:
    def broken(name: str, weights: str | None) -> ModelRuntime:
        raise RuntimeError("checkpoint is corrupt")

    async def scenario() -> None:
        app = create_app(Settings(models=(MODEL,)), loader=broken)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                for _ in range(100):
                    r = await c.get("/v2/health/ready")
                    if "corrupt" in r.text:
                        break
                    await asyncio.sleep(0.01)
                assert r.status_code == 503 and "corrupt" in r.json()["error"]

    run(scenario())


def test_split_inference_and_errors(runtime: ModelRuntime, device_runtime: DeviceRuntime) -> None:
    split = device_runtime.points[10].name
    url = f"/v2/models/{MODEL}/splits/{split}/infer"
    good = make_frame(device_runtime, split)
    msgpack = {"Content-Type": wire.CONTENT_TYPE}

    async def scenario() -> None:
        settings = Settings(models=(MODEL,), max_body_bytes=4096 * 1024)
        async with serve(settings, lambda n, w: runtime) as c:
            r = await c.post(url, content=good, headers=msgpack)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["split"] == split and len(body["top_k"][0]) == 5
            assert set(body["timings_ms"]) == {"decode", "queue", "compute"}
            assert body["batch_size"] >= 1 and body["id"] == "test"
            # The split may be given by index too.
            index = device_runtime.point(split).index
            r = await c.post(
                f"/v2/models/{MODEL}/splits/{index}/infer",
                content=good,
                headers=msgpack,
                params={"top_k": 2},
            )
            assert r.status_code == 200 and len(r.json()["top_k"][0]) == 2

            cases = {
                "garbage": (url, b"\x00garbage", msgpack, 400),
                "truncated": (url, good[: len(good) // 2], msgpack, 400),
                "wrong split in frame": (
                    url,
                    make_frame(device_runtime, device_runtime.points[3].name),
                    msgpack,
                    400,
                ),
                "fingerprint": (
                    url,
                    make_frame(device_runtime, split, fingerprint="0" * 32),
                    msgpack,
                    409,
                ),
                "unknown split": (f"/v2/models/{MODEL}/splits/nope/infer", good, msgpack, 404),
                "split index out of range": (
                    f"/v2/models/{MODEL}/splits/999/infer",
                    good,
                    msgpack,
                    404,
                ),
                "unknown model": (f"/v2/models/nope/splits/{split}/infer", good, msgpack, 404),
                "content type": (url, good, {"Content-Type": "application/json"}, 415),
                "no content type": (url, good, {}, 415),
                "too large": (url, b"x" * (4096 * 1024 + 1), msgpack, 413),
                "bad top_k": (url + "?top_k=0", good, msgpack, 400),
            }
            for name, (path, content, headers, status) in cases.items():
                r = await c.post(path, content=content, headers=headers)
                assert r.status_code == status, (name, r.status_code, r.text)
                assert isinstance(r.json()["error"], str) and r.json()["error"], name
                assert "Traceback" not in r.text, name
            assert (await c.get("/v2/health/ready")).status_code == 200
            assert (await c.post(url, content=good, headers=msgpack)).status_code == 200

    run(scenario())


def test_classify_and_oip_json(
    runtime: ModelRuntime,
    device_runtime: DeviceRuntime,
    photos: dict[str, object],
    local_top1: dict[str, int],
) -> None:
    from shared.preprocess import center_crop, encode_jpeg, to_tensor

    crop = center_crop(photos["coffee"], runtime.spec.preprocessing)  # type: ignore[arg-type]
    x = to_tensor(crop, runtime.spec.preprocessing)

    async def scenario() -> None:
        async with serve(Settings(models=(MODEL,)), lambda n, w: runtime) as c:
            r = await c.post(
                f"/v2/models/{MODEL}/classify",
                content=encode_jpeg(crop, 95),
                headers={"Content-Type": "image/jpeg"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["top_k"][0][0]["index"] == local_top1["coffee"]
            assert r.json()["split"] == "cloud"
            # One name for the whole model: the answer's split and the metrics' label agree.
            scrape = (await c.get("/metrics")).text
            assert 'split="cloud",status="200"' in scrape and 'split="full"' not in scrape
            r = await c.post(
                f"/v2/models/{MODEL}/classify",
                content=b"not an image",
                headers={"Content-Type": "image/jpeg"},
            )
            assert r.status_code == 400 and r.json()["error"]

            oip = {
                "id": "a",
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 224, 224],
                        "datatype": "FP32",
                        "data": x.flatten().tolist(),
                    }
                ],
            }
            r = await c.post(f"/v2/models/{MODEL}/infer", json=oip)
            assert r.status_code == 200, r.text
            out = r.json()["outputs"][0]
            assert out["shape"] == [1, 1000] and out["datatype"] == "FP32"
            logits = torch.tensor(out["data"])
            torch.testing.assert_close(logits, device_runtime.run_full(x)[0], rtol=1e-4, atol=1e-4)
            bad = {"inputs": [{**oip["inputs"][0], "shape": [1, 3, 32, 32]}]}  # type: ignore
            r = await c.post(f"/v2/models/{MODEL}/infer", json=bad)
            assert r.status_code == 400 and "shape" in r.json()["error"]
            r = await c.post(f"/v2/models/{MODEL}/infer", json={"inputs": []})
            assert r.status_code == 400 and r.json()["error"]

    run(scenario())


def test_metadata_and_openapi(runtime: ModelRuntime) -> None:
    async def scenario() -> None:
        async with serve(Settings(models=(MODEL,)), lambda n, w: runtime) as c:
            meta = (await c.get(f"/v2/models/{MODEL}")).json()
            assert meta["platform"] and meta["versions"] == [runtime.fingerprint]
            assert len(meta["split_points"]) == len(runtime.points)
            assert (await c.get("/v2")).json()["name"] == "splitserve"
            spec = (await c.get("/openapi.json")).json()
            split_op = spec["paths"]["/v2/models/{model}/splits/{split}/infer"]["post"]
            assert wire.CONTENT_TYPE in split_op["requestBody"]["content"]
            assert {"400", "404", "409", "413", "415"} <= set(split_op["responses"])
            r = await c.get("/nowhere")
            assert r.status_code == 404 and r.json()["error"]

    run(scenario())


def test_probe_times_only_the_server_not_the_upload(runtime: ModelRuntime) -> None:
    """The link estimator subtracts server_ms from the round trip: a body that takes 300 ms to
    arrive must not be reported as 300 ms of server work."""

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(3):
            await asyncio.sleep(0.1)
            yield b"\x00" * 1000

    async def scenario() -> None:
        async with serve(Settings(models=(MODEL,)), lambda n, w: runtime) as c:
            r = await c.post(f"/v2/models/{MODEL}/probe", content=trickle(),
                             headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200 and r.json()["received_bytes"] == 3000
            assert r.json()["server_ms"] < 50

    run(scenario())
