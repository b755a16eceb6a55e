"""Pure ASGI middleware that must act before a request body is read: auth and the body limit.

Both are ASGI middleware rather than FastAPI dependencies because FastAPI reads and parses a
declared body before it solves dependencies; a stranger or an oversized upload must be turned
away before that.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable, Sequence

from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import PayloadTooLargeError, RequestTimeoutError

__all__ = ["ActivityMiddleware", "AuthMiddleware", "BodyLimitMiddleware", "OPEN_PATHS", "bearer"]

# Declares the scheme in the OpenAPI schema for the routes that need a key. It checks nothing:
# AuthMiddleware has already done that, before any body was read.
bearer = HTTPBearer(auto_error=False, description="Required when SPLITSERVE_API_KEYS is set")

# Reachable without a key: probes from orchestrators and scrapers, and the API's own docs.
OPEN_PATHS = ("/v2/health/", "/metrics", "/docs", "/openapi.json")


async def send_json_error(send: Send, status: int, message: str,
                          headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """``Authorization: Bearer <key>``: 401 when missing, 403 when wrong, compared in constant
    time against every configured key. With no keys configured, everything is open."""

    def __init__(self, app: ASGIApp, *, api_keys: Sequence[str]) -> None:
        self.app = app
        self._keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(given) > 1:  # which one counts would depend on the proxy in front: neither
            await send_json_error(send, 400, "send one Authorization header, not several")
            return
        header = given[0] if given else b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            await send_json_error(send, 401, "missing API key: send 'Authorization: Bearer <key>'",
                                  [(b"www-authenticate", b'Bearer realm="splitserve"')])
            return
        token = token.strip()
        # No early exit: the time taken must not say which key, or how much of one, matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        if not matched:
            await send_json_error(send, 403, "API key not accepted")
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``max_body_bytes``: from ``Content-Length`` before reading anything,
    and while streaming for chunked uploads that don't declare a length. 408 for a body that
    doesn't arrive within ``body_timeout_s``, so a client trickling bytes can't hold a request
    (and its memory) open forever."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self._limit = max_body_bytes
        self._timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_json_error(send, 400, "Content-Length is not an integer")
                return
            if length > self._limit:
                await send_json_error(
                    send, 413, f"body of {length} bytes exceeds the limit of {self._limit} bytes",
                    [(b"connection", b"close")])
                return
        received = 0
        deadline: float | None = None
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, body_done
            if body_done:  # later receives wait for a disconnect: no limit applies to those
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self._timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError as exc:
                raise RequestTimeoutError(
                    f"request body not received within {self._timeout_s:g} s") from exc
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self._limit:
                    raise PayloadTooLargeError(f"body exceeds the limit of {self._limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class ActivityMiddleware:
    """Calls ``enter()`` when an HTTP request starts and ``exit()`` when it ends, whatever the
    outcome: the idle trimmer (memory.py) waits for none to be in flight."""

    def __init__(self, app: ASGIApp, *, enter: Callable[[], None],
                 exit: Callable[[], None]) -> None:
        self.app = app
        self._enter, self._exit = enter, exit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self._exit()
