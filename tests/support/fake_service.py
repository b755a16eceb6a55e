"""A tiny real HTTP server on 127.0.0.1 that answers what a test tells it to: a wrong or broken
"service" for the device to talk to over a real socket.

    >>> import httpx
    >>> def answer(method: str, path: str) -> tuple[int, object]:
    ...     return 200, {"unexpected": True}
    >>> with JsonService(answer) as fake:
    ...     httpx.get(f"{fake.url}/v2/models/m").json()
    {'unexpected': True}
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

__all__ = ["Answer", "JsonService", "LoopbackServer"]

#: ``(method, path) -> (status, body)`` or ``(status, body, headers)``; a ``bytes`` body is sent
#: as is, anything else as JSON.
Answer = Callable[[str, str], tuple[int, object] | tuple[int, object, dict[str, str]]]


class LoopbackServer:
    """``handler`` served on 127.0.0.1 at a free port, from a thread: ``with`` starts and stops
    it, ``url`` is where it listens."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class JsonService(LoopbackServer):
    """``with JsonService(answer) as fake: ... fake.url ...``; ``fake.requests`` lists
    ``(method, path)`` in the order they came."""

    def __init__(self, answer: Answer) -> None:
        self.requests: list[tuple[str, str]] = []
        super().__init__(_handler(answer, self.requests))


def _handler(answer: Answer, log: list[tuple[str, str]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real service

        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)  # drain the body, or the connection's next request breaks
            path = self.path.split("?", 1)[0]
            log.append((self.command, path))
            status, body, *extra = answer(self.command, path)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for name, value in (extra[0] if extra else {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: pytest shows what the test asserts, not an access log

    return Handler
