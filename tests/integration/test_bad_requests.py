"""Bad requests over a real socket: each gets its status and a JSON error, and the service stays
ready and correct."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from device_client.local_service import LocalService
from device_client.runtime import DeviceRuntime
from shared import wire
from tests.helpers import make_frame

MODEL = "efficientnet_lite0"
MSGPACK = {"Content-Type": wire.CONTENT_TYPE}


@pytest.fixture(scope="module")
def split(device_runtime: DeviceRuntime) -> str:
    return device_runtime.points[8].name


def _cases(device: DeviceRuntime, split: str) -> dict[str, tuple[str, bytes, dict[str, str], int]]:
    url = f"/v2/models/{MODEL}/splits/{split}/infer"
    good = make_frame(device, split)
    other = device.points[2].name
    shape_lie = wire.decode(make_frame(device, other)).tensors
    return {
        "random bytes": (url, bytes(range(256)) * 4, MSGPACK, 400),
        "truncated frame": (url, good[:-7], MSGPACK, 400),
        "empty body": (url, b"", MSGPACK, 400),
        "wrong version": (url, good.replace(b"\xa1v\x01", b"\xa1v\x02", 1), MSGPACK, 400),
        "tensor of another split point": (
            url,
            make_frame(device, split, tensors=shape_lie),
            MSGPACK,
            400,
        ),
        "wrong fingerprint": (url, make_frame(device, split, fingerprint="ab" * 16), MSGPACK, 409),
        "unknown split point": (f"/v2/models/{MODEL}/splits/not_a_layer/infer", good, MSGPACK, 404),
        "unknown model": (f"/v2/models/alexnet/splits/{split}/infer", good, MSGPACK, 404),
        "wrong content type": (url, good, {"Content-Type": "text/plain"}, 415),
    }


def test_bad_requests_get_their_status_and_the_service_stays_ready(
    live_service: LocalService, device_runtime: DeviceRuntime, split: str
) -> None:
    good = make_frame(device_runtime, split)
    with httpx.Client(base_url=live_service.url) as client:
        for name, (path, body, headers, status) in _cases(device_runtime, split).items():
            r = client.post(path, content=body, headers=headers)
            assert r.status_code == status, (name, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json", name
            error = r.json()["error"]
            assert isinstance(error, str) and error and "Traceback" not in error, name
            assert client.get("/v2/health/ready").status_code == 200, name
        r = client.post(f"/v2/models/{MODEL}/splits/{split}/infer", content=good, headers=MSGPACK)
        assert r.status_code == 200 and r.json()["top_k"][0][0]["index"] >= 0


def test_oversized_body_is_refused_before_it_is_read(
    live_service: LocalService, split: str
) -> None:
    """Declare a 1 GiB body and send none of it: a 413 must come back at once, which proves the
    service decided from the headers without waiting for (or buffering) the body."""
    parts = urlsplit(live_service.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v2/models/{MODEL}/splits/{split}/infer HTTP/1.1\r\n"
                f"Host: {parts.netloc}\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
                f"Content-Length: {2**30}\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "exceeds the limit" in json.loads(body)["error"]
    assert httpx.get(f"{live_service.url}/v2/health/ready").status_code == 200


def test_chunked_upload_over_the_limit_and_a_trickled_body_are_refused(split: str) -> None:
    """Without a Content-Length the size limit applies while streaming; a body that never
    finishes arriving gets 408 when the request timeout passes."""
    env = {"SPLITSERVE_MAX_BODY_BYTES": "65536", "SPLITSERVE_PROFILE_REPEATS": "0",
           "SPLITSERVE_REQUEST_TIMEOUT_S": "1"}
    with LocalService(models=[MODEL], env=env) as service:

        def chunks() -> Iterator[bytes]:
            for _ in range(64):
                yield b"\x00" * 4096

        r = httpx.post(f"{service.url}/v2/models/{MODEL}/splits/{split}/infer",
                       content=chunks(), headers=MSGPACK)
        assert r.status_code == 413 and "limit" in r.json()["error"]

        parts = urlsplit(service.url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall((f"POST /v2/models/{MODEL}/splits/{split}/infer HTTP/1.1\r\n"
                          f"Host: x\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
                          "Content-Length: 1000\r\n\r\n").encode() + b"\x00" * 10)
            started = time.monotonic()
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 408"), head[:80]
        assert time.monotonic() - started < 5
        assert httpx.get(f"{service.url}/v2/health/ready").status_code == 200
