"""An emulated network link on loopback: a userspace TCP proxy that shapes both directions.

    async with ShapedProxy(("127.0.0.1", 8000), PROFILES["3g"]) as proxy:
        ...  # point the device at proxy.url instead of the service
        proxy.set_shape(PROFILES["wifi"])  # takes effect for the next byte read

Each direction is one FIFO link shared by every connection through the proxy:

    serialization: a chunk of n bytes leaves the link n * 8 / bps seconds after the previous
                   chunk left it (or after it arrived, if the link was idle): a queue with a rate
    propagation:   the chunk is delivered one_way_ms after it left the link

so a request of B bytes on an idle link arrives B * 8 / uplink_bps + rtt_ms / 2 after it was sent,
and RTT = 2 x one-way delay. The proxy reads at most ``chunk_bytes`` (16 KiB) at a time, so the
rate applies smoothly (a 16 KiB chunk is 82 ms at 1.6 Mbit/s, 0.26 ms at 500 Mbit/s); order is
kept, and a half-close (EOF) travels behind the data like any chunk. Queued data is bounded
(``max_queued_chunks``): a full queue stops reading, so the sender sees TCP backpressure as it
would behind a real bottleneck with a large buffer.

What it does not emulate: loss, jitter, and TCP's own congestion control over the emulated path
(both TCP hops are on loopback, so there is no slow start to pay: an upload goes at the link rate
from its first byte). ``kernel_tbf`` in ``bench.netns`` shapes bandwidth in the kernel instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = ["PROFILES", "LinkShape", "ShapedProxy"]

CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True)
class LinkShape:
    """Rates in bits/s for each direction, and the round trip time (twice the one-way delay).

        LinkShape("3g", uplink_bps=1.6e6, downlink_bps=1.6e6, rtt_ms=150.0).one_way_ms  # 75.0
    """

    name: str
    uplink_bps: float  # device -> service
    downlink_bps: float  # service -> device
    rtt_ms: float

    def __post_init__(self) -> None:
        for field in ("uplink_bps", "downlink_bps"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)!r}")
        if not self.rtt_ms >= 0:
            raise ValueError(f"rtt_ms must be >= 0, got {self.rtt_ms!r}")

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2

    def to_json(self) -> dict[str, float | str]:
        return {
            "name": self.name,
            "uplink_mbps": self.uplink_bps / 1e6,
            "downlink_mbps": self.downlink_bps / 1e6,
            "rtt_ms": self.rtt_ms,
        }


# Typical figures, not worst cases: HSPA "3G" as Chrome DevTools' "Fast 3G" (1.6 Mbit/s, 150 ms
# RTT; symmetric here: uplink is what matters), LTE with its usual asymmetry, a home Wi-Fi to a
# nearby region, and a wired LAN to an on-premises server.
PROFILES: dict[str, LinkShape] = {
    s.name: s
    for s in (
        LinkShape("3g", uplink_bps=1.6e6, downlink_bps=1.6e6, rtt_ms=150.0),
        LinkShape("lte", uplink_bps=6e6, downlink_bps=20e6, rtt_ms=50.0),
        LinkShape("wifi", uplink_bps=30e6, downlink_bps=30e6, rtt_ms=10.0),
        LinkShape("lan", uplink_bps=500e6, downlink_bps=500e6, rtt_ms=1.0),
    )
}


class _Direction:
    """One direction of the link: its rate, its delay, and when its serializer is next free."""

    def __init__(self, bps: float, delay_s: float) -> None:
        self.bps, self.delay_s = bps, delay_s
        self.free_at = 0.0  # loop time at which the last queued chunk leaves the link
        self.bytes = 0

    def schedule(self, n_bytes: int, now: float) -> float:
        """Queue ``n_bytes`` arriving at ``now``; returns the loop time to deliver them."""
        start = max(now, self.free_at)
        self.free_at = start + n_bytes * 8 / self.bps
        self.bytes += n_bytes
        return self.free_at + self.delay_s


_EOF = b""


class ShapedProxy:
    """Listens on ``host:port`` (0: a free port) and forwards every connection to ``target``
    through the emulated link. Start with ``await proxy.start()`` or ``async with``."""

    def __init__(
        self,
        target: tuple[str, int],
        shape: LinkShape,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        chunk_bytes: int = CHUNK_BYTES,
        max_queued_chunks: int = 256,
    ) -> None:
        if chunk_bytes < 1 or max_queued_chunks < 1:
            raise ValueError("chunk_bytes and max_queued_chunks must be >= 1")
        self.target = target
        self.host, self.port = host, port
        self.chunk_bytes = chunk_bytes
        self.max_queued_chunks = max_queued_chunks
        self.shape = shape
        self.up = _Direction(shape.uplink_bps, shape.one_way_ms / 1e3)
        self.down = _Direction(shape.downlink_bps, shape.one_way_ms / 1e3)
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._aborts: dict[asyncio.Task[None], Callable[[], None]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_shape(self, shape: LinkShape) -> None:
        """Change rates and delay now. Chunks already queued keep the times they were given."""
        self.shape = shape
        self.up.bps, self.up.delay_s = shape.uplink_bps, shape.one_way_ms / 1e3
        self.down.bps, self.down.delay_s = shape.downlink_bps, shape.one_way_ms / 1e3

    async def start(self) -> ShapedProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        # Reset open connections rather than cancel their tasks: asyncio's stream server logs
        # every handler task that ends cancelled as an error.
        for abort in list(self._aborts.values()):
            abort()
        if self._aborts:
            await asyncio.wait(list(self._aborts), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ShapedProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections += 1
        aborted = asyncio.Event()
        writers = [client_w]

        def abort() -> None:  # one side failed, or the proxy closes: reset both, end both pipes
            aborted.set()
            for w in writers:
                w.transport.abort()

        self._aborts[task] = abort
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                client_w.close()
                return
            writers.append(server_w)
            if aborted.is_set():
                abort()
                return

            pipes = asyncio.gather(
                self._pipe(client_r, server_w, self.up, abort),
                self._pipe(server_r, client_w, self.down, abort),
            )
            stop = asyncio.ensure_future(aborted.wait())
            waiting: set[asyncio.Future[Any]] = {pipes, stop}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                pipes.cancel()
                stop.cancel()
                await asyncio.gather(pipes, stop, return_exceptions=True)
                for w in (client_w, server_w):
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()
        finally:
            del self._aborts[task]

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Direction,
        abort: Callable[[], None],
    ) -> None:
        """One direction of one connection: read, stamp, queue; deliver in order when due."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.max_queued_chunks)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                while True:
                    data = await reader.read(self.chunk_bytes)
                    await queue.put((link.schedule(len(data), loop.time()), data))
                    if not data:
                        return
            except OSError:
                abort()  # a reset travels on at once, unlike an orderly EOF

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not data:
                    if writer.can_write_eof() and not writer.is_closing():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        reading = asyncio.ensure_future(read())
        try:
            await deliver()
        except OSError:
            abort()  # the receiving side went away: nothing left to deliver to
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
