"""The layer that owns the sockets: uvicorn with a header-read timeout and a connection cap.

uvicorn alone bounds neither. Its keep-alive timer starts only after a response, and any byte
received cancels it, so a connection that never sends a request, or trickles its headers, is held
forever; ``limit_concurrency`` counts idle connections too and answers 503 to *every* request
once they fill it, health probes included. So, as nginx does:

* every connection must deliver a complete request head within ``header_timeout_s`` of being
  accepted (or of its previous response), else it is closed;
* at most ``max_connections`` are held. When a new one arrives at the cap, the oldest connection
  still waiting for its request head is closed to make room (nginx's ``ngx_drain_connections``
  reuses idle connections the same way); if none is idle, the new one is closed at once. Both
  happen in ``connection_made``, before a byte is parsed or an ASGI task exists;
* the cap stays below the open-file limit, so ``accept()`` does not hit EMFILE; if it still does
  (another part of the process holds descriptors), asyncio's one-traceback-per-retry report is
  replaced by one warning line every few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from collections import OrderedDict
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from cloud_server.settings import Settings

__all__ = ["DropQueryString", "GuardedH11Protocol", "connection_cap", "protocol_class", "serve"]

log = logging.getLogger("cloud_server")

# Descriptors kept free for what is not a client connection: the listening socket, model and
# log files, torch's and the thread pool's pipes.
FD_RESERVE = 64
# asyncio accepts up to its ``backlog`` argument sockets per pass of the loop, and a refused one
# is closed only a few passes later, so several batches are open before any is shed. The batch
# is kept small and the kernel's listen queue (``Settings.backlog``) is set separately.
ACCEPT_BATCH = 64
IN_FLIGHT_BATCHES = 4
_EMFILE_LOG_EVERY_S = 5.0


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to fit under the process's open-file limit with room for the
    sockets accepted but not yet shed.

    >>> connection_cap(10) <= 10
    True
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 32
    spare = FD_RESERVE + ACCEPT_BATCH * IN_FLIGHT_BATCHES
    return max(1, min(max_connections, soft - open_now - spare))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a request-head deadline and a connection cap.

    ``protocol_class`` makes a subclass with the limits filled in; uvicorn builds one instance per
    accepted connection.
    """

    max_connections = 1000
    header_timeout_s = 10.0
    # Connections waiting for a request head, oldest first: the ones to shed at the cap. One per
    # class: ``protocol_class`` gives each server its own.
    waiting: OrderedDict[GuardedH11Protocol, None] = OrderedDict()
    shed_count = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            if self.waiting:
                oldest, _ = self.waiting.popitem(last=False)
                oldest._close_idle()
            else:  # every slot is serving a request: this one gets no slot
                type(self).shed_count += 1
                transport.abort()
                return
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        if self.transport is None:  # refused in connection_made: uvicorn never saw it
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._head_received()  # a request is in flight: the body has its own timeout

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (
                self.cycle is None or self.cycle.response_complete):
            self._await_head()  # keep-alive: the next request head has the same deadline

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a malformed or oversized request head in text/plain; the service's
        # errors are JSON everywhere.
        body = json.dumps({"error": msg}).encode()
        head = h11.Response(status_code=400, reason=b"Bad Request", headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")])
        for event in (head, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()

    def _await_head(self) -> None:
        self._head_received()
        self.waiting[self] = None
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._close_idle)

    def _head_received(self) -> None:
        self.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _close_idle(self) -> None:
        self._head_received()
        self.connections.discard(self)  # its slot is free now, not after connection_lost
        type(self).shed_count += 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def protocol_class(*, max_connections: int, header_timeout_s: float) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` subclass with these limits, for ``uvicorn.Config(http=...)``."""
    return type("GuardedH11", (GuardedH11Protocol,), {
        "max_connections": max_connections, "header_timeout_s": header_timeout_s,
        "waiting": OrderedDict(), "shed_count": 0})


class _Server(uvicorn.Server):
    """Sets the kernel's listen queue apart from asyncio's accept batch, and reports EMFILE on
    ``accept()`` as one line every few seconds instead of a traceback per attempt (asyncio
    retries in a loop and reports each one)."""

    def __init__(self, config: uvicorn.Config, *, listen_backlog: int) -> None:
        super().__init__(config)
        self.listen_backlog = listen_backlog

    async def startup(self, sockets: Any = None) -> None:
        loop = asyncio.get_running_loop()
        default = loop.get_exception_handler()
        last_s = -_EMFILE_LOG_EVERY_S

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            nonlocal last_s
            exc = context.get("exception")
            if isinstance(exc, OSError) and "out of system resource" in context.get("message", ""):
                now = time.monotonic()
                if now - last_s >= _EMFILE_LOG_EVERY_S:
                    last_s = now
                    log.warning("accept() failed: %s; retrying (open-file limit %d)",
                                exc.strerror, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                return
            if default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handle)
        await super().startup(sockets)
        for server in self.servers:
            for listening in server.sockets:
                # listen() again on a listening socket resizes its queue (Linux, BSD); on a dup,
                # since asyncio hands out a wrapper without listen().
                with listening.dup() as sock:
                    sock.listen(self.listen_backlog)


class DropQueryString(logging.Filter):
    """Access-log lines name the path only: a query string may carry a secret (``?api_key=``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].partition("?")[0], *args[3:])
        return True


def serve(app: Any, settings: Settings) -> None:
    """Run ``app`` until SIGTERM/SIGINT, with the limits of ``settings``."""
    cap = connection_cap(settings.max_connections)
    if cap < settings.max_connections:
        log.info("holding at most %d connections (open-file limit %d)", cap,
                 resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        http=protocol_class(max_connections=cap, header_timeout_s=settings.header_timeout_s),
        backlog=ACCEPT_BATCH, timeout_keep_alive=int(max(1, settings.keep_alive_s)),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
    logging.getLogger("uvicorn.access").addFilter(DropQueryString())
    _Server(config, listen_backlog=settings.backlog).run()
