"""The device finishes locally when the service can't answer: in-process, with transports that
fail in every way the network can."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from PIL import Image

from device_client.breaker import CircuitBreaker
from device_client.client import ServiceClient
from device_client.pipeline import Device
from device_client.runtime import DeviceRuntime
from shared.errors import AuthError, ServiceUnavailableError


def _transport(kind: str) -> httpx.AsyncBaseTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if kind == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if kind == "read-timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if kind == "stall":
            await asyncio.sleep(3600)
        if kind == "503":
            return httpx.Response(503, json={"error": "queue full"}, headers={"Retry-After": "1"})
        if kind == "500":
            return httpx.Response(500, json={"error": "internal error"})
        if kind == "garbage":
            return httpx.Response(200, content=b"\x00not json")
        if kind == "403":
            return httpx.Response(403, json={"error": "API key not accepted"})
        raise AssertionError(kind)

    return httpx.MockTransport(handler)


FAILURES = ["connect", "read-timeout", "stall", "503", "500", "garbage"]


@pytest.mark.parametrize("kind", FAILURES, ids=FAILURES)
@pytest.mark.parametrize("split", ["_blocks.9", "cloud"], ids=["split", "cloud"])
def test_every_failure_falls_back_to_a_local_answer(
    kind: str,
    split: str,
    device_runtime: DeviceRuntime,
    photos: dict[str, Image.Image],
    local_top1: dict[str, int],
) -> None:
    async def run() -> object:
        async with ServiceClient("http://service.test", transport=_transport(kind)) as client:
            device = Device(device_runtime, client, timeout_s=0.5)
            device._checked = True  # skip the metadata check: the transport can't answer it
            return await device.infer(photos["coffee"], split=split, name="coffee")

    result = asyncio.run(run())
    assert result.ran == "device" and result.split == split  # type: ignore[attr-defined]
    assert result.fallback  # type: ignore[attr-defined]
    assert result.top5[0].index == local_top1["coffee"]  # type: ignore[attr-defined]
    if kind == "stall":  # bounded by the deadline, not by the stall
        assert result.timings.total < 3000  # type: ignore[attr-defined]


def test_breaker_opens_and_skips_the_service(
    device_runtime: DeviceRuntime, photos: dict[str, Image.Image]
) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    async def run() -> list[object]:
        async with ServiceClient("http://s.test", transport=httpx.MockTransport(handler)) as c:
            device = Device(
                device_runtime, c, breaker=CircuitBreaker(failure_threshold=2, cooldown_s=60)
            )
            device._checked = True
            return [await device.infer(photos["rocket"], split="_blocks.5") for _ in range(5)]

    results = asyncio.run(run())
    assert calls == 2  # then the circuit is open: no more waiting on a dead service
    reasons = [r.fallback for r in results]  # type: ignore[attr-defined]
    assert all(r.startswith("connection") for r in reasons[:2])
    assert all(r.startswith("circuit_open") for r in reasons[2:])


def test_no_fallback_raises_and_4xx_is_not_a_fallback(
    device_runtime: DeviceRuntime, photos: dict[str, Image.Image]
) -> None:
    async def run(kind: str, fallback: bool) -> object:
        async with ServiceClient("http://s.test", transport=_transport(kind)) as client:
            device = Device(device_runtime, client, fallback=fallback)
            device._checked = True
            return await device.infer(photos["rocket"], split="_blocks.5")

    with pytest.raises(ServiceUnavailableError):
        asyncio.run(run("connect", False))
    with pytest.raises(AuthError):
        asyncio.run(run("403", True))


def test_auto_against_a_dead_or_stalled_service_runs_locally(
        device_runtime: DeviceRuntime, photos: dict[str, Image.Image],
        local_top1: dict[str, int]) -> None:
    from device_client.auto import AutoSplit
    from shared.planner import CLOUD, DEVICE, DeviceCost, DeviceProfile

    profile = DeviceProfile(device_runtime.name, device_runtime.fingerprint, (
        DeviceCost(DEVICE, 500.0, 0.0, 0), DeviceCost(CLOUD, 0.0, 1.0, 20_000)))

    async def run(kind: str) -> object:
        async with ServiceClient("http://s.test", transport=_transport(kind)) as client:
            auto = AutoSplit(client, profile, timeout_s=0.3)
            device = Device(device_runtime, client, auto=auto, timeout_s=0.3)
            return await device.infer(photos["coffee"], split="auto")

    for kind, reason in (("connect", "connection: "), ("stall", "timeout: ")):
        result = asyncio.run(run(kind))
        assert result.split == "device" and result.ran == "device"  # type: ignore[attr-defined]
        assert result.top5[0].index == local_top1["coffee"]  # type: ignore[attr-defined]
        # Never reached: said as a fixed split says it, not a silent `"fallback": null`.
        assert result.fallback.startswith(reason), result.fallback  # type: ignore[attr-defined]
