"""Services that misbehave on purpose: a tiny HTTP/1.1 server on loopback with one fault each.

    with FakeService("stall") as fake:      # accepts, reads the request, never answers
        run_device_against(fake.url)

Every fake answers every path the same way, so the device meets the fault at its first request
(the metadata check), as it would meet a broken deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from types import TracebackType

from device_client.local_service import free_port

__all__ = ["BEHAVIOURS", "FakeService"]


def _response(
    status: str, body: bytes, content_type: str = "application/json", extra: str = ""
) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}"
        f"\r\n{extra}\r\n"
    ).encode() + body


_NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>"
    b"502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>"
)

#: behaviour -> what the fake sends for every request (None: nothing, then see ``_handle``).
BEHAVIOURS: dict[str, bytes | None] = {
    "dead": None,  # nothing listens on the port at all
    "stall": None,  # accepts and reads, never answers
    "close": None,  # reads the request, closes without a word
    "500": _response("500 Internal Server Error", b'{"error": "internal error"}'),
    "503": _response(
        "503 Service Unavailable", b'{"error": "queue full"}', extra="Retry-After: 1\r\n"
    ),
    "502 html": _response("502 Bad Gateway", _NGINX_502, "text/html"),
    "garbage 200": _response("200 OK", b"\x00\xffnot json at all"),
    "deep json": _response("200 OK", b"[" * 100_000 + b"]" * 100_000),
    "not http": b"SSH-2.0-OpenSSH_9.6\r\n",
    "wrong json": _response("200 OK", json.dumps({"unexpected": True}).encode()),
}


class FakeService:
    """One misbehaving HTTP service on a free loopback port, served from a background thread."""

    def __init__(self, behaviour: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; known: {', '.join(BEHAVIOURS)}")
        self.behaviour = behaviour
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fake-{behaviour}", daemon=True)

    def __enter__(self) -> FakeService:
        if self.behaviour != "dead":
            self._thread.start()
            if not self._started.wait(10):
                raise RuntimeError("the fake service did not start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await self._handle(reader, writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            except asyncio.CancelledError:
                pass  # shutting down: a stalled connection is cut here
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", self.port)
        self._started.set()
        async with server:
            await self._stop.wait()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: one answer per request until the client goes
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
            if length:
                await reader.readexactly(length)
            if self.behaviour == "stall":
                await asyncio.sleep(3600)
            answer = BEHAVIOURS[self.behaviour]
            if answer is None:  # "close"
                return
            writer.write(answer)
            await writer.drain()
            if self.behaviour == "not http":
                return
