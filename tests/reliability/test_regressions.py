"""Each bug the reliability runs found, pinned down in-process where it lived."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from PIL import Image
from starlette.requests import ClientDisconnect

from cloud_server.errors import status_for
from device_client.client import ServiceClient
from device_client.pipeline import Device
from device_client.runtime import DeviceRuntime
from shared.errors import ServiceError, ServiceUnavailableError, UnknownSplitPointError


@pytest.mark.parametrize("key", ["²", "٣", "１", "-1", " 3"], ids=repr)
def test_non_ascii_digit_split_names_are_unknown_not_a_crash(
    device_runtime: DeviceRuntime, key: str
) -> None:
    # "²".isdigit() is True but int("²") raises ValueError: it was a 500 from the service.
    # int() does read "٣" (Arabic-Indic 3) and "１" (fullwidth 1), but an index is ASCII.
    with pytest.raises(UnknownSplitPointError):
        device_runtime.point(key)
    assert device_runtime.point("3").index == 3


def test_a_client_that_hangs_up_is_not_a_server_error() -> None:
    assert status_for(ClientDisconnect()) == 499  # kept out of the 5xx counts


BODIES = {
    "not json": b"\x00\xffnot json",
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_malformed_answers_are_service_failures(
    body: bytes, device_runtime: DeviceRuntime, photos: dict[str, Image.Image]
) -> None:
    """A 200 whose body is not what the service sends: the device falls back, even on the
    metadata check (which used to raise JSONDecodeError or RecursionError past the fallback)."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))

    async def run() -> object:
        async with ServiceClient("http://s.test", transport=transport) as client:
            with pytest.raises(ServiceUnavailableError) as info:
                await client.metadata("efficientnet_lite0")
            assert info.value.reason == "bad_response"
            with pytest.raises(ServiceUnavailableError):
                await client.probe("efficientnet_lite0", b"x" * 100)
            with pytest.raises(ServiceUnavailableError):
                await client.infer_split("efficientnet_lite0", "_blocks.9", b"frame")
            return await Device(device_runtime, client).infer(photos["rocket"], split="_blocks.9")

    result = asyncio.run(run())
    assert result.ran == "device" and result.fallback.startswith("bad_response")  # type: ignore[attr-defined]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"ok"', b"{}"], ids=["list", "string", "empty"])
def test_json_outside_the_contract_is_a_service_error_not_a_fallback(
    body: bytes, device_runtime: DeviceRuntime, photos: dict[str, Image.Image]
) -> None:
    """JSON of the wrong shape is a wrong server (or another version): falling back would hide
    it at every image, so it is one ServiceError, as a fingerprint mismatch is a ConfigError."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))

    async def run() -> None:
        async with ServiceClient("http://s.test", transport=transport) as client:
            with pytest.raises(ServiceError, match="service answer from http://s.test"):
                await client.probe("efficientnet_lite0", b"x" * 100)
            with pytest.raises(ServiceError):
                await client.infer_split("efficientnet_lite0", "_blocks.9", b"frame")
            await Device(device_runtime, client).infer(photos["rocket"], split="_blocks.9")

    with pytest.raises(ServiceError):
        asyncio.run(run())


def test_deeply_nested_error_body_is_still_an_error_line() -> None:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(500, content=b"[" * 100_000 + b"]" * 100_000)
    )

    async def run() -> None:
        async with ServiceClient("http://s.test", transport=transport) as client:
            await client.metadata("efficientnet_lite0")

    with pytest.raises(ServiceUnavailableError, match="answered 500"):
        asyncio.run(run())


def test_non_finite_logits_never_reach_the_response() -> None:
    from cloud_server.routers.infer import _require_finite
    from shared.errors import PayloadError

    _require_finite(torch.zeros(2, 10))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(PayloadError, match="non-finite"):
            _require_finite(torch.tensor([[0.0, bad]]))
