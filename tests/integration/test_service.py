"""The service under load and at its limits, over real sockets: auth, batching, backpressure,
metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from device_client.local_service import LocalService
from device_client.runtime import DeviceRuntime
from shared import wire
from tests.helpers import make_frame

MODEL = "efficientnet_lite0"
MSGPACK = {"Content-Type": wire.CONTENT_TYPE}
FAST_START = {"SPLITSERVE_PROFILE_REPEATS": "0"}


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(rf"{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def _burst(url: str, body: bytes, n: int, headers: dict[str, str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(client.post(url, content=body, headers=headers) for _ in range(n))
            )
        )


@pytest.fixture(scope="module")
def keyed_service() -> Iterator[LocalService]:
    with LocalService(
        models=[MODEL], env={**FAST_START, "SPLITSERVE_API_KEYS": "k-one,k-two"}
    ) as service:
        yield service


def test_api_keys(keyed_service: LocalService, device_runtime: DeviceRuntime) -> None:
    split = device_runtime.points[12].name
    url = f"{keyed_service.url}/v2/models/{MODEL}/splits/{split}/infer"
    body = make_frame(device_runtime, split)
    missing = httpx.post(url, content=body, headers=MSGPACK)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.post(url, content=body, headers={**MSGPACK, "Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]
    for key in ("k-one", "k-two"):
        ok = httpx.post(url, content=body, headers={**MSGPACK, "Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text
    # Metadata needs the key too; health and metrics stay open for probes and scrapers.
    assert httpx.get(f"{keyed_service.url}/v2/models/{MODEL}").status_code == 401
    assert httpx.get(f"{keyed_service.url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{keyed_service.url}/metrics").status_code == 200


def test_auth_is_checked_before_the_body_is_read(keyed_service: LocalService) -> None:
    """Headers only, no body: a 401 comes back at once, so the body was never awaited."""
    parts = urlsplit(keyed_service.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v2/models/{MODEL}/splits/3/infer HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: 100000\r\n\r\n"
            ).encode()
        )
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401")


def test_api_key_is_never_logged(keyed_service: LocalService) -> None:
    httpx.get(f"{keyed_service.url}/v2/models/{MODEL}", headers={"Authorization": "Bearer k-one"})
    httpx.get(f"{keyed_service.url}/v2/models/{MODEL}", headers={"Authorization": "Bearer xyz-9"})
    log = keyed_service.log_path.read_text()
    assert "GET /v2/models" in log  # the access log is on...
    assert "k-one" not in log and "k-two" not in log and "xyz-9" not in log  # ...keys aren't


def test_device_cli_sends_the_key(
    keyed_service: LocalService, tmp_path: object, photos: dict[str, object]
) -> None:
    import os
    from pathlib import Path

    path = Path(str(tmp_path)) / "coffee.jpg"
    photos["coffee"].save(path)  # type: ignore[attr-defined]
    base = [
        sys.executable,
        "-m",
        "device_client",
        "infer",
        "--runtime",
        "torch",
        str(path),
        "--server",
        keyed_service.url,
        "--split",
        "12",
        "--json",
        "--no-fallback",
    ]
    env = {k: v for k, v in os.environ.items() if k != "SPLITSERVE_API_KEY"}
    ok = subprocess.run([*base, "--api-key", "k-two"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    from_env = subprocess.run(
        base, capture_output=True, text=True, env={**env, "SPLITSERVE_API_KEY": "k-one"}
    )
    assert from_env.returncode == 0, from_env.stderr
    bad = subprocess.run([*base, "--api-key", "wrong"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "403" in bad.stderr


def test_batching_under_concurrent_load_and_metrics_move(device_runtime: DeviceRuntime) -> None:
    split = device_runtime.points[5].name
    env = {**FAST_START, "SPLITSERVE_MAX_BATCH_SIZE": "8", "SPLITSERVE_MAX_QUEUE_DELAY_MS": "50"}
    with LocalService(models=[MODEL], env=env) as service:
        before = httpx.get(f"{service.url}/metrics").text
        url = f"{service.url}/v2/models/{MODEL}/splits/{split}/infer"
        responses = asyncio.run(_burst(url, make_frame(device_runtime, split), 16, MSGPACK))
        after = httpx.get(f"{service.url}/metrics").text
    assert all(r.status_code == 200 for r in responses)
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    assert all(1 <= s <= 8 for s in sizes)
    labels = {"model": MODEL, "split": split}
    assert (
        _metric(after, "splitserve_requests_total", **labels, status="200")
        - _metric(before, "splitserve_requests_total", **labels, status="200")
    ) == 16
    assert (
        _metric(after, "splitserve_batch_size_count", **labels) < 16
    )  # fewer passes than requests
    assert _metric(after, "splitserve_compute_seconds_count", **labels) >= 2
    assert _metric(after, "splitserve_queue_seconds_count", **labels) == 16
    assert _metric(after, "splitserve_decode_seconds_sum", **labels) > 0
    assert _metric(after, "splitserve_received_bytes_total", **labels) > 16 * 1000
    assert "splitserve_queue_depth " in after
    # the models, torch and onnxruntime, frozen out of the collector's walks once loaded
    assert _metric(after, "splitserve_gc_frozen_objects") > 10_000


def test_full_queue_answers_503_with_retry_after_at_once(device_runtime: DeviceRuntime) -> None:
    split = device_runtime.points[0].name  # the costliest tail: the queue fills fast
    env = {**FAST_START, "SPLITSERVE_MAX_BATCH_SIZE": "1", "SPLITSERVE_MAX_QUEUE": "2"}
    with LocalService(models=[MODEL], env=env) as service:
        url = f"{service.url}/v2/models/{MODEL}/splits/{split}/infer"
        responses = asyncio.run(_burst(url, make_frame(device_runtime, split), 24, MSGPACK))
        assert httpx.get(f"{service.url}/v2/health/ready").status_code == 200
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["error"]
            assert r.elapsed.total_seconds() < 5  # a fast no, not a timeout


def test_graceful_shutdown_finishes_the_request_in_flight(device_runtime: DeviceRuntime) -> None:
    split = device_runtime.points[10].name
    # A long queue delay holds the request in the batcher while SIGTERM arrives: the batcher
    # waits for it to fill while a second request, whose body trickles in, is on its way.
    env = {**FAST_START, "SPLITSERVE_MAX_QUEUE_DELAY_MS": "1500", "SPLITSERVE_MAX_BATCH_SIZE": "64"}
    service = LocalService(models=[MODEL], env=env).start()
    try:
        url = f"{service.url}/v2/models/{MODEL}/splits/{split}/infer"
        frame = make_frame(device_runtime, split)

        async def trickle() -> AsyncIterator[bytes]:
            yield frame[:100]
            await asyncio.sleep(2.5)  # past the fill delay: the first one runs without it
            yield frame[100:]

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                slow = asyncio.create_task(client.post(url, content=trickle(), headers=MSGPACK))
                await asyncio.sleep(0.3)
                pending = asyncio.create_task(client.post(url, content=frame, headers=MSGPACK))
                await asyncio.sleep(0.5)
                assert service.process is not None
                service.process.send_signal(signal.SIGTERM)
                return await pending, await slow

        response, slow = asyncio.run(scenario())
        assert response.status_code == 200 and response.json()["top_k"][0]
        assert slow.status_code == 200  # its body, still arriving at SIGTERM, was finished too
        assert service.process is not None
        # uvicorn re-raises the signal once it has shut down cleanly, as a process should.
        assert service.process.wait(30) in (0, -signal.SIGTERM)
        # It really was in the batcher when SIGTERM came, 0.5 s after it was sent.
        assert response.json()["timings_ms"]["queue"] >= 1000
    finally:
        service.kill()
