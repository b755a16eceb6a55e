"""Warming the request path up at start-up, so the first requests don't pay for it.

FastAPI builds much of its routing on first use: the routes of an included router when a request
is first matched against them, and an endpoint's request handler (its source file and line,
read with ``inspect``) when it is first called. Measured on the first ``/classify`` of a fresh
service: 20-40 ms, several times the forward pass, on the first request of every run.

``warm_up`` sends requests through the app in-process, before the server takes connections:
one for a path no route has (every router is matched against it), and one per inference
endpoint that FastAPI refuses at parameter validation (an ``X-Request-Timeout-Ms`` of 0). That
one runs the route's handler up to the endpoint function and never into it, so it reads no
body, queues nothing and counts in no metric; the answers are 404 and 400.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from starlette.types import ASGIApp, Message

__all__ = ["INFERENCE_PATHS", "warm_up"]

log = logging.getLogger("cloud_server")

# The inference endpoints (routers/infer.py), with placeholders for their path parameters.
INFERENCE_PATHS = ("/v2/models/-/splits/0/infer", "/v2/models/-/classify", "/v2/models/-/infer")
_UNROUTED = "/-/warm-up"


async def warm_up(app: ASGIApp, *, api_key: str | None = None,
                  paths: Sequence[str] = INFERENCE_PATHS) -> list[int]:
    """Send the warm-up requests to ``app``; returns their statuses, in order (404, then 400
    per path). ``api_key``: one the app accepts, when it requires one. Never raises: a failed
    warm-up only leaves the first requests slower.

        statuses = await warm_up(app)   # in the lifespan, before the server takes requests
    """
    headers = [(b"x-request-timeout-ms", b"0"), (b"content-type", b"application/octet-stream")]
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode()))
    statuses = []
    for method, path in [("GET", _UNROUTED), *(("POST", p) for p in paths)]:
        try:
            statuses.append(await _request(app, method, path, headers))
        except Exception as exc:  # noqa: BLE001 (the service must start regardless)
            log.debug("warm-up %s %s failed: %r", method, path, exc)
            statuses.append(0)
    return statuses


async def _request(app: ASGIApp, method: str, path: str,
                   headers: list[tuple[bytes, bytes]]) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {}}
    status = 0
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await app(scope, receive, send)
    return status
