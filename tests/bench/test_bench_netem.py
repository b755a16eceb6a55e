"""Tests for bench.netem: the shaping proxy's rate, delay, ordering and half-close on loopback."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import pytest

from bench.netem import PROFILES, LinkShape, ShapedProxy

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _shaped(elapsed_s: float, expected_s: float) -> bool:
    """The link took at least its modelled time (less would be a shaper that does not shape),
    and not wildly more: a shared, busy CPU only ever makes the event loop late."""
    return 0.85 * expected_s <= elapsed_s <= 2.5 * expected_s + 0.05


async def _through_proxy(
    handler: Handler, shape: LinkShape, client: Callable[..., Awaitable[float]]
) -> tuple[float, ShapedProxy]:
    """Start ``handler`` as a server and a proxy in front of it; run ``client(host, port)``."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ShapedProxy(("127.0.0.1", port), shape) as proxy:
            elapsed = await client(proxy.host, proxy.port)
            return elapsed, proxy
    finally:
        server.close()
        await server.wait_closed()


async def _read_then_reply(n_bytes: int, reply: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(n_bytes)
        writer.write(reply)
        await writer.drain()
        writer.close()

    return handle


def _upload_client(payload: bytes, reply_bytes: int) -> Callable[[str, int], Awaitable[float]]:
    async def run(host: str, port: int) -> float:
        reader, writer = await asyncio.open_connection(host, port)
        started = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        await reader.readexactly(reply_bytes)
        elapsed = time.perf_counter() - started
        writer.close()
        await writer.wait_closed()
        return elapsed

    return run


def test_upload_pays_serialization_and_one_rtt() -> None:
    shape = LinkShape("t", uplink_bps=1e6, downlink_bps=10e6, rtt_ms=40.0)
    payload = os.urandom(50_000)

    async def main() -> tuple[float, ShapedProxy]:
        handler = await _read_then_reply(len(payload), b"ok")
        return await _through_proxy(handler, shape, _upload_client(payload, 2))

    elapsed, proxy = asyncio.run(main())
    expected = 50_000 * 8 / 1e6 + 2 * 0.020  # 400 ms on the wire + 20 ms each way
    assert _shaped(elapsed, expected), elapsed
    assert proxy.up.bytes == 50_000
    assert proxy.down.bytes == 2
    assert proxy.connections == 1


def test_small_echo_takes_one_rtt() -> None:
    shape = LinkShape("t", uplink_bps=1e9, downlink_bps=1e9, rtt_ms=100.0)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(1))
        await writer.drain()
        writer.close()

    async def main() -> tuple[float, ShapedProxy]:
        return await _through_proxy(echo, shape, _upload_client(b"x", 1))

    elapsed, _ = asyncio.run(main())
    assert _shaped(elapsed, 0.100), elapsed


def test_half_close_travels_behind_the_data_and_order_is_kept() -> None:
    shape = LinkShape("t", uplink_bps=20e6, downlink_bps=20e6, rtt_ms=10.0)
    payload = os.urandom(200_000)  # 13 chunks of 16 KiB

    async def count_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's half-close arrives
        writer.write(data[::-1])
        writer.write_eof()
        await writer.drain()
        writer.close()

    async def client(host: str, port: int) -> float:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        writer.write_eof()  # half-close: we still read the answer
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert answer == payload[::-1]
        return 0.0

    asyncio.run(_through_proxy(count_until_eof, shape, client))


def test_shape_changes_at_runtime() -> None:
    fast = LinkShape("fast", uplink_bps=1e9, downlink_bps=1e9, rtt_ms=10.0)
    slow = LinkShape("slow", uplink_bps=1e6, downlink_bps=1e9, rtt_ms=60.0)
    payload = os.urandom(10_000)

    async def echo_sizes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await reader.readexactly(len(payload))
            writer.write(b"k")
            await writer.drain()
        writer.close()

    async def client(host: str, port: int) -> float:
        reader, writer = await asyncio.open_connection(host, port)
        times = []
        for shape in (fast, slow):
            proxy.set_shape(shape)
            started = time.perf_counter()
            writer.write(payload)
            await reader.readexactly(1)
            times.append(time.perf_counter() - started)
        writer.close()
        await writer.wait_closed()
        assert times[0] < 0.060, times  # the fast shape: ~10 ms
        assert _shaped(times[1], 0.080 + 0.060), times  # 80 ms serialization
        return 0.0

    async def main() -> None:
        nonlocal proxy
        server = await asyncio.start_server(echo_sizes, "127.0.0.1", 0)
        proxy = ShapedProxy(("127.0.0.1", server.sockets[0].getsockname()[1]), fast)
        async with proxy:
            await client(proxy.host, proxy.port)
        server.close()
        await server.wait_closed()

    proxy: ShapedProxy
    asyncio.run(main())


def test_connections_share_the_link() -> None:
    shape = LinkShape("t", uplink_bps=1e6, downlink_bps=1e9, rtt_ms=0.0)
    payload = os.urandom(25_000)

    async def main() -> list[float]:
        handler = await _read_then_reply(len(payload), b"ok")
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        async with ShapedProxy(("127.0.0.1", server.sockets[0].getsockname()[1]), shape) as p:
            upload = _upload_client(payload, 2)
            times = await asyncio.gather(upload(p.host, p.port), upload(p.host, p.port))
        server.close()
        await server.wait_closed()
        return list(times)

    times = asyncio.run(main())
    # 2 x 25 KB through one 1 Mbit/s link: the later one finishes after ~400 ms, not 200 ms.
    assert _shaped(max(times), 0.400), times


def test_unreachable_target_closes_the_client() -> None:
    async def main() -> bytes:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead_port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        async with ShapedProxy(("127.0.0.1", dead_port), PROFILES["lan"]) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data

    assert asyncio.run(main()) == b""


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uplink_bps": 0.0, "downlink_bps": 1e6, "rtt_ms": 1.0},
        {"uplink_bps": 1e6, "downlink_bps": -1.0, "rtt_ms": 1.0},
        {"uplink_bps": 1e6, "downlink_bps": 1e6, "rtt_ms": -1.0},
    ],
    ids=["zero-uplink", "negative-downlink", "negative-rtt"],
)
def test_link_shape_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LinkShape("bad", **kwargs)


def test_profiles_are_the_documented_ones() -> None:
    assert {name: (s.uplink_bps, s.rtt_ms) for name, s in PROFILES.items()} == {
        "3g": (1.6e6, 150.0),
        "lte": (6e6, 50.0),
        "wifi": (30e6, 10.0),
        "lan": (500e6, 1.0),
    }
    assert PROFILES["3g"].one_way_ms == 75.0
