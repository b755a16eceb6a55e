"""A minimal HTTP/1.1 keep-alive client for the load generator: one connection, one request at a
time, bytes in and bytes out.

    conn = Connection("127.0.0.1", 8000)
    status, headers, body = await conn.post("/v2/...", frame, content_type=CONTENT_TYPE,
                                            timeout_s=30)
    await conn.close()

Why not httpx, the project's client: measured side by side (``python -m bench.service_clients``:
16 clients, the same service, frames and loop, alternating rounds), httpx with its pool sized to
the clients cost 1.57 ms of the load generator's CPU per request against 0.14 ms here, and the
service answered 61 req/s against 73 (medians of 4 rounds; aiohttp is not installed). On a core
the load generator shares with anything else, that CPU is what the service would wait for.
This client costs a small fraction of it:
it writes a request prebuilt but for its length, reads the status line, the headers and a
``Content-Length`` (or chunked) body, and nothing else. It is for talking to our own service on
loopback, not a general client.
"""

from __future__ import annotations

import asyncio

__all__ = ["Connection", "HttpError"]

_MAX_HEAD_BYTES = 64 * 1024


class HttpError(Exception):
    """The connection failed or the answer was not HTTP/1.1 we understand. ``kind`` names the
    failure in one word (``ConnectError``, ``RemoteProtocolError``, ``ReadError``...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class Connection:
    """One keep-alive connection to ``host:port``, opened on first use and again after an error
    or a ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(
        self, path: str, body: bytes, *, content_type: str, timeout_s: float
    ) -> tuple[int, dict[str, str], bytes]:
        """POST ``body``; returns status, headers (lower-case names) and body. Raises
        ``TimeoutError`` after ``timeout_s`` and ``HttpError`` for anything else; either way the
        connection is closed, since its state is unknown."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        try:
            return await asyncio.wait_for(self._exchange(head, body), timeout_s)
        except BaseException:
            await self.close()
            raise

    async def get(self, path: str, *, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        """GET ``path``, as ``post``."""
        head = f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode("latin-1")
        try:
            return await asyncio.wait_for(self._exchange(head, b""), timeout_s)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _exchange(self, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            try:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise HttpError("ConnectError", str(exc)) from exc
        reader, writer = self._reader, self._writer
        assert reader is not None
        try:
            writer.write(head + body)  # one send: a 20 KB copy costs less than a second syscall
            await writer.drain()
            status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            if headers.get("transfer-encoding", "").lower() == "chunked":
                data = await _read_chunked(reader)
            else:
                data = await reader.readexactly(int(headers.get("content-length", "0")))
        except asyncio.IncompleteReadError as exc:
            raise HttpError("ReadError", "the server closed the connection") from exc
        except asyncio.LimitOverrunError as exc:
            raise HttpError("RemoteProtocolError", "response head too long") from exc
        except (ConnectionError, OSError) as exc:
            raise HttpError(type(exc).__name__, str(exc)) from exc
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, data


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status code and headers of a response head (status line + headers + blank line)."""
    if len(raw) > _MAX_HEAD_BYTES:
        raise HttpError("RemoteProtocolError", "response head too long")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError("RemoteProtocolError", f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError("RemoteProtocolError", f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise HttpError("RemoteProtocolError", "bad chunk size") from exc
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from our service: the final CRLF
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
