"""One place that maps splitserve errors to HTTP statuses and ``{"error": ...}`` bodies.

Bodies say what was wrong in one sentence and never carry a stack trace; unexpected errors are
logged here with their traceback and answered with a bare 500.
"""

from __future__ import annotations

import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from shared.errors import (
    DeadlineExceededError,
    FingerprintMismatchError,
    ImageError,
    OverloadedError,
    PartitionError,
    PayloadError,
    PayloadTooLargeError,
    RequestTimeoutError,
    SplitServeError,
    UnknownModelError,
    UnknownSplitPointError,
    UnsupportedMediaTypeError,
)

__all__ = ["install_error_handlers", "status_for"]

log = logging.getLogger("cloud_server")

# Most specific first: the first matching class decides.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownModelError, 404),
    (UnknownSplitPointError, 404),
    (PayloadTooLargeError, 413),
    (RequestTimeoutError, 408),
    (UnsupportedMediaTypeError, 415),
    (PayloadError, 400),
    (ImageError, 400),
    (FingerprintMismatchError, 409),
    (OverloadedError, 503),
    (DeadlineExceededError, 504),
    (PartitionError, 500),
)


# nginx's "client closed request": the client hung up before its body arrived. Nobody reads the
# answer; the status keeps such requests out of the 5xx counts in the metrics.
CLIENT_CLOSED = 499


def status_for(exc: BaseException) -> int:
    """The HTTP status of an exception: 4xx for the client's errors, 5xx for ours."""
    if isinstance(exc, ClientDisconnect):
        return CLIENT_CLOSED
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, RequestValidationError):
        return 400
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


# "<_io.BytesIO object at 0x7f...>": third-party messages name objects by heap address, which
# helps an attacker defeat ASLR and helps nobody else.
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{8,}\b")


def _message(exc: BaseException) -> str:
    return _ADDRESS.sub("<object>", _raw_message(exc))


def _raw_message(exc: BaseException) -> str:
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"invalid request: {where}: {first.get('msg', 'invalid')}"
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    return str(exc) or type(exc).__name__


async def _handle_splitserve(request: Request, exc: Exception) -> JSONResponse:
    status = status_for(exc)
    headers = {}
    if isinstance(exc, OverloadedError):
        # Rounded up: a client back before the queue drained would only be refused again.
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if status >= 500 and not isinstance(exc, OverloadedError | DeadlineExceededError):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": _message(exc)}, status_code=status, headers=headers)


async def _handle_http(request: Request, exc: Exception) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    return JSONResponse({"error": _message(exc)}, status_code=status_for(exc), headers=headers)


async def _handle_disconnect(request: Request, exc: Exception) -> JSONResponse:
    log.info("%s %s: the client disconnected before its body arrived", request.method,
             request.url.path)
    return JSONResponse({"error": "client disconnected"}, status_code=CLIENT_CLOSED)


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SplitServeError, _handle_splitserve)
    app.add_exception_handler(HTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_http)
    app.add_exception_handler(ClientDisconnect, _handle_disconnect)
    app.add_exception_handler(Exception, _handle_unexpected)
