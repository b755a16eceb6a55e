"""``/classify`` makes one trip to a worker thread for a small upload (the header is read on the
event loop) and two for a large one (header, then decode)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from cloud_server.app import create_app
from cloud_server.routers.infer import INLINE_HEADER_BYTES
from cloud_server.runtime import ModelRuntime, load_runtime
from cloud_server.settings import Settings
from shared.preprocess import encode_jpeg, reference_photo

MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    return load_runtime(MODEL, profile_repeats=0)


def _noisy_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (320, 320, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(("make", "content_type", "trips"), [
    (lambda: encode_jpeg(reference_photo()), "image/jpeg", ["decode_image"]),
    (_noisy_png, "image/png", ["image_header", "decode_image"]),
], ids=["small-jpeg", "large-png"])
def test_thread_trips_per_upload(runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch,
                                 make: Callable[[], bytes], content_type: str,
                                 trips: list[str]) -> None:
    body = make()
    assert (len(body) <= INLINE_HEADER_BYTES) == (len(trips) == 1)
    app = create_app(Settings(models=(MODEL,)), loader=lambda name, weights: runtime)
    seen: list[str] = []
    to_thread = asyncio.to_thread

    async def counting(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(func, "__name__", "?"))
        return await to_thread(func, *args, **kwargs)

    async def run() -> int:
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(app.state.service.wait_ready, 30)
            monkeypatch.setattr(asyncio, "to_thread", counting)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                r = await client.post(f"/v2/models/{MODEL}/classify", content=body,
                                      headers={"Content-Type": content_type})
            return r.status_code

    assert asyncio.run(run()) == 200
    assert seen == trips
