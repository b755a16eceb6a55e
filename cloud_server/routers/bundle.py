"""``GET /v2/models/{model}/bundle``: the model's ONNX bundle as one tar, for devices to cache.

The bundle is the service's own (``cloud_server.bundles``), for the weights it serves. Getting it
ready can mean exporting it (about 10 s) and then writing the archive: both run in a worker
thread. A request waits a little for that; past ``WAIT_S`` it is answered 503 with Retry-After
while the work goes on, so a device polls instead of holding a connection through an export.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Security
from fastapi.responses import FileResponse, Response

from cloud_server.bundle_archive import CONTENT_TYPE, Archive, build_archive, etag_matches
from cloud_server.bundles import service_bundle
from cloud_server.middleware import bearer
from cloud_server.service import ServiceDep
from cloud_server.settings import Settings
from shared.errors import BundleError, NotReadyError
from shared.schemas import ErrorBody

__all__ = ["BundleShelf", "router", "shelf_for"]

router = APIRouter(tags=["models"], dependencies=[Security(bearer)])

WAIT_S = 2.0  # a ready bundle's first archive takes well under this; an export takes longer
RETRY_AFTER_S = 5.0
FAILED_FOR_S = 60.0  # a failed export is answered from memory this long, then tried again

#: ``(model, fingerprint, weights) -> Archive``; blocking, run in a worker thread.
Prepare = Callable[[str, str, str | None], Archive]


class BundleShelf:
    """The archives the service hands out, one per (model, fingerprint), each prepared once
    off the event loop. A failed preparation is answered as such (500) for ``failed_for_s``,
    then tried again."""

    def __init__(self, prepare: Prepare, *, wait_s: float = WAIT_S,
                 retry_after_s: float = RETRY_AFTER_S, failed_for_s: float = FAILED_FOR_S
                 ) -> None:
        self._prepare = prepare
        self._wait_s = wait_s
        self._retry_after_s = retry_after_s
        self._failed_for_s = failed_for_s
        self._ready: dict[tuple[str, str], Archive] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[Archive]] = {}
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}

    async def archive(self, model: str, fingerprint: str, weights: str | None) -> Archive:
        """The archive, or ``NotReadyError`` (503) while it is still being prepared."""
        key = (model, fingerprint)
        done = self._ready.get(key)
        if done is not None and done.path.is_file():
            return done
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() < failed[0] + self._failed_for_s:
            # Devices poll; a failing export must not start again for every poll.
            raise BundleError(f"the {model} bundle could not be prepared: {failed[1]}")
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(
                asyncio.to_thread(self._prepare, model, fingerprint, weights))
            self._pending[key] = task
            task.add_done_callback(lambda t: self._settle(key, t))
        try:
            # shield: a client that gives up does not cancel the export for the next one
            return await asyncio.wait_for(asyncio.shield(task), self._wait_s)
        except TimeoutError:
            raise NotReadyError(f"the {model} bundle is being exported; retry in "
                                f"{self._retry_after_s:g} s",
                                retry_after_s=self._retry_after_s) from None

    def _settle(self, key: tuple[str, str], task: asyncio.Future[Archive]) -> None:
        self._pending.pop(key, None)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here; logged by whoever awaited the task
        if exc is None:
            self._ready[key] = task.result()
            self._failed.pop(key, None)
        else:
            self._failed[key] = (time.monotonic(), str(exc) or type(exc).__name__)


def service_prepare(settings: Settings) -> Prepare:
    """The shelf's ``prepare`` for a real service: its bundle (exported if needed), archived."""
    def prepare(model: str, fingerprint: str, weights: str | None) -> Archive:
        bundle = service_bundle(model, fingerprint, weights=weights, root=settings.bundle_root(),
                                int8=settings.bundle_int8)
        return build_archive(bundle)

    return prepare


def shelf_for(request: Request) -> BundleShelf:
    shelf: BundleShelf = request.app.state.bundle_shelf
    return shelf


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
          "description": "The bundle's files in one uncompressed tar (manifest.json first)"},
    304: {"description": "If-None-Match named the current ETag: the device's copy is current"},
    **{code: {"model": ErrorBody, "description": text} for code, text in [
        (401, "Missing API key"), (403, "Wrong API key"), (404, "Unknown model"),
        (503, "Still loading, or the bundle is being exported (see Retry-After)")]},
}


@router.get("/v2/models/{model}/bundle", response_class=FileResponse, responses=_RESPONSES)
async def model_bundle(
        model: str, request: Request, service: ServiceDep,
        if_none_match: Annotated[str | None, Header(max_length=4096)] = None) -> Response:
    """The model's exported ONNX bundle as one tar, with a strong ETag (the sha256 of its
    manifest, quoted); ``If-None-Match`` with that ETag answers 304. Streamed from disk."""
    runtime = service.runtime(model)  # 404 for an unknown model, 503 while loading
    counter = service.metrics.bundle_requests
    weights = service.settings.model_weights()[model]
    try:
        archive = await shelf_for(request).archive(model, runtime.fingerprint, weights)
    except NotReadyError:
        counter.labels(model=model, status="503").inc()
        raise
    # no-cache: a cache may keep it but must ask first (with the ETag) before reusing it
    headers = {"ETag": archive.etag, "Cache-Control": "no-cache"}
    if if_none_match is not None and etag_matches(if_none_match, archive.etag):
        counter.labels(model=model, status="304").inc()
        return Response(status_code=304, headers=headers)
    counter.labels(model=model, status="200").inc()
    return FileResponse(archive.path, media_type=CONTENT_TYPE, headers=headers,
                        filename=f"{model}-{runtime.fingerprint}.tar")
