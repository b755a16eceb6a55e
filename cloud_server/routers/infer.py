"""Inference: split frames (msgpack), whole images (the `cloud` candidate), OIP JSON tensors.

Every path does the same three steps: decode the body off the event loop, queue it for a batched
forward pass, answer. Errors are raised as splitserve errors and mapped in ``errors.py``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Header, Query, Request, Security
from pydantic import ValidationError

from cloud_server.batching import BatchResult
from cloud_server.errors import status_for
from cloud_server.middleware import bearer
from cloud_server.runtime import ModelRuntime
from cloud_server.service import Service, ServiceDep
from shared import wire
from shared.candidates import WHOLE_MODEL
from shared.errors import PayloadError, ShapeMismatchError, UnsupportedMediaTypeError
from shared.predictions import top_k
from shared.schemas import (
    ErrorBody,
    InferResponse,
    OipRequest,
    OipResponse,
    OipTensor,
    PredictionBody,
    ProbeResponse,
    TimingsBody,
)

router = APIRouter(tags=["inference"], dependencies=[Security(bearer)])

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
# Uploads up to this size have their header read on the event loop: 20-80 us for a JPEG, PNG or
# WebP, less than a trip to a worker thread and back (0.1-0.3 ms, milliseconds when other
# processes share the core). Larger ones may hold many chunks before the pixels: a thread.
INLINE_HEADER_BYTES = 256 * 1024
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in [
        (400, "Malformed frame, image or tensor"), (401, "Missing API key"),
        (403, "Wrong API key"), (404, "Unknown model or split point"),
        (408, "Body not received in time"), (409, "Frame made with different weights"),
        (413, "Body too large"),
        (415, "Wrong Content-Type"), (503, "Queue full or still loading (see Retry-After)"),
        (504, "Deadline passed")]}
_MSGPACK_BODY = {"requestBody": {"required": True, "content": {wire.CONTENT_TYPE: {
    "schema": {"type": "string", "format": "binary",
               "description": "A splitserve wire frame (see shared/wire.py)"}}}}}
_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}}}

TopK = Annotated[int, Query(ge=1, le=1000, description="Predictions per sample")]
TimeoutMs = Annotated[float | None, Header(
    alias="X-Request-Timeout-Ms", gt=0,
    description="Give up (504) if not answered within this many ms")]
RequestId = Annotated[str | None, Header(alias="X-Request-Id", max_length=128)]


@router.post("/v2/models/{model}/splits/{split}/infer", response_model=InferResponse,
             responses=_ERRORS, openapi_extra=_MSGPACK_BODY)
async def infer_split(model: str, split: str, request: Request, service: ServiceDep,
                      top_k: TopK = 5, timeout_ms: TimeoutMs = None) -> InferResponse:
    """Run the tail of ``split`` (a split point's name or index) on a msgpack frame."""
    with _track(service) as labels:
        runtime = service.runtime(model)
        point = runtime.point(split)
        labels.update(model=model, split=point.name)
        _require_type(request, (wire.CONTENT_TYPE,))
        with service.incoming():
            body = await request.body()
            service.metrics.received_bytes.labels(**labels).inc(len(body))
            settings = service.settings
            started = time.perf_counter()
            frame, inputs, _ = await asyncio.to_thread(
                runtime.decode_frame, body, point, max_frame_bytes=settings.max_body_bytes,
                max_batch=settings.max_request_batch)
            decode_ms = (time.perf_counter() - started) * 1e3
        return await _answer(service, runtime, point.name, inputs, decode_ms, frame.request_id,
                             top_k, timeout_ms)


@router.post("/v2/models/{model}/classify", response_model=InferResponse, responses=_ERRORS,
             openapi_extra=_IMAGE_BODY)
async def classify(model: str, request: Request, service: ServiceDep, top_k: TopK = 5,
                   timeout_ms: TimeoutMs = None, x_request_id: RequestId = None
                   ) -> InferResponse:
    """Classify an encoded image (JPEG, PNG, WebP) with the whole model: the `cloud` candidate.

    The image is resized and centre-cropped as the model expects; an image already exactly the
    crop size is taken as cropped.
    """
    with _track(service) as labels:
        runtime = service.runtime(model)
        labels.update(model=model, split=WHOLE_MODEL)
        _require_type(request, IMAGE_TYPES)
        with service.incoming():
            body = await request.body()
            service.metrics.received_bytes.labels(**labels).inc(len(body))
            started = time.perf_counter()
            limit = service.settings.max_image_bytes
            if len(body) <= INLINE_HEADER_BYTES:
                header = runtime.image_header(body, max_decoded_bytes=limit)
            else:
                header = await asyncio.to_thread(runtime.image_header, body,
                                                 max_decoded_bytes=limit)
            # Checked again by the decoder; here it sizes the reservation, so a burst of large
            # images decodes a few at a time rather than all at once.
            async with service.image_budget.reserve(min(header.decoded_bytes, limit)):
                x = await asyncio.to_thread(runtime.decode_image, body, max_decoded_bytes=limit)
            decode_ms = (time.perf_counter() - started) * 1e3
        return await _answer(service, runtime, WHOLE_MODEL, (x,), decode_ms, x_request_id or "",
                             top_k, timeout_ms)


@router.post("/v2/models/{model}/infer", response_model=OipResponse, responses=_ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/OipRequest"}}}}})
async def infer_oip(model: str, request: Request, service: ServiceDep,
                    timeout_ms: TimeoutMs = None) -> OipResponse:
    """Open Inference Protocol: the whole model on one FP32 input tensor, logits out."""
    with _track(service) as labels:
        runtime = service.runtime(model)
        labels.update(model=model, split=WHOLE_MODEL)
        if "content-type" in request.headers:  # FastAPI took a JSON body without one too
            _require_type(request, ("application/json",))
        # Read here, not by FastAPI: the body limit's 408 and 413 then reach the client as such
        # (FastAPI turns any error while reading a declared body into a 400), and the JSON is
        # sized up before it is parsed, and parsed off the event loop.
        with service.incoming():
            body = await request.body()
            service.metrics.received_bytes.labels(**labels).inc(len(body))
            started = time.perf_counter()
            settings = service.settings
            oip = await asyncio.to_thread(_parse_oip, body, runtime, settings.max_request_batch)
            x = await asyncio.to_thread(_oip_input, oip.inputs[0], runtime,
                                        settings.max_request_batch)
            decode_ms = (time.perf_counter() - started) * 1e3
        result = await service.submit(runtime, WHOLE_MODEL, (x,),
                                      timeout_s=_timeout_s(service, timeout_ms))
        _require_finite(result.output)
        _observe(runtime, WHOLE_MODEL, x.shape[0], decode_ms, result)
        logits = result.output.float()
        return OipResponse(
            model_name=runtime.name, model_version=runtime.fingerprint, id=oip.id or "",
            outputs=[OipTensor(name="logits", shape=list(logits.shape), datatype="FP32",
                               data=logits.flatten().tolist())])


@router.post("/v2/models/{model}/probe", response_model=ProbeResponse, responses=_ERRORS,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}}})
async def probe(model: str, request: Request, service: ServiceDep
                ) -> ProbeResponse:
    """Upload sink for the device's link estimator: reads the body, does no work."""
    service.runtime(model)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
    # The body trickling in is the link's time, which the device is measuring: like the other
    # endpoints, the server's own time starts once the body has arrived.
    started = time.perf_counter()
    return ProbeResponse(received_bytes=received,
                         server_ms=(time.perf_counter() - started) * 1e3)


async def _answer(service: Service, runtime: ModelRuntime, key: str,
                  inputs: tuple[torch.Tensor, ...], decode_ms: float, request_id: str,
                  k: int, timeout_ms: float | None) -> InferResponse:
    result = await service.submit(runtime, key, inputs, timeout_s=_timeout_s(service, timeout_ms))
    _require_finite(result.output)
    _observe(runtime, key, inputs[0].shape[0], decode_ms, result)
    labels = {"model": runtime.name, "split": key}
    service.metrics.decode_seconds.labels(**labels).observe(decode_ms / 1e3)
    return InferResponse(
        model_name=runtime.name, model_version=runtime.fingerprint, id=request_id,
        split=key,
        top_k=[[PredictionBody(index=p.index, label=p.label, prob=p.prob) for p in row]
               for row in top_k(result.output, runtime.labels, k)],
        timings_ms=TimingsBody(decode=round(decode_ms, 3), queue=round(result.queue_ms, 3),
                               compute=round(result.compute_ms, 3)),
        batch_size=result.batch_size, load=service.load(runtime))


def _observe(runtime: ModelRuntime, key: str, rows: int, decode_ms: float,
             result: BatchResult) -> None:
    """What the request cost the service per row: its own decode, its rows' share of the
    forward pass. Alone in its pass, that is what the next lone request would cost."""
    runtime.observe(key, decode_ms=decode_ms / rows,
                    compute_ms=result.compute_ms / max(result.batch_rows, 1),
                    alone=result.batch_rows == 1)


def _timeout_s(service: Service, timeout_ms: float | None) -> float:
    limit = service.settings.request_timeout_s
    return limit if timeout_ms is None else min(limit, timeout_ms / 1e3)


def _require_finite(logits: torch.Tensor) -> None:
    # Legal but absurd inputs (a float32-max scale on every byte) overflow the tail to inf and
    # NaN; that is the request's fault, and NaN has no softmax, no top-k and no JSON.
    # numpy's check, not torch's: a tenth of the cost on a (1, 1000) row, on the event loop.
    if not np.isfinite(logits.detach().float().numpy()).all():
        raise PayloadError("the inputs drive the model to non-finite logits: their values are "
                           "far outside any real activation's range")


def _require_type(request: Request, allowed: tuple[str, ...]) -> None:
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got not in allowed:
        raise UnsupportedMediaTypeError(
            f"Content-Type must be {' or '.join(allowed)}, got {got or 'none'!r}")


# Brackets and commas the JSON around the tensor may spend: the envelope, names, parameters.
_JSON_ENVELOPE = 1024


def _parse_oip(body: bytes, runtime: ModelRuntime, max_batch: int) -> OipRequest:
    """Validate an OIP JSON body, after bounding its arrays and values by what the largest
    valid input needs: a body of millions of ``[]`` is refused before the parser builds them.
    Counting bytes overcounts (brackets in strings), which only makes the bound stricter."""
    dims = list(runtime.spec.input_shape[1:])
    arrays, size = 1, max_batch  # nested data [N][C][H][W]: 1 + N + N*C + N*C*H arrays
    for d in dims[:-1]:
        arrays += size
        size *= d
    arrays += size
    values = max_batch * math.prod(dims)
    if body.count(b"[") > arrays + _JSON_ENVELOPE:
        raise PayloadError(f"JSON body has more arrays than an input of at most {max_batch} "
                           f"samples needs ({arrays})")
    if body.count(b",") > values + arrays + _JSON_ENVELOPE:
        raise PayloadError(f"JSON body has more values than an input of at most {max_batch} "
                           f"samples needs ({values})")
    try:
        return OipRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        reason = errors[0]["msg"] if errors else "invalid"
        raise PayloadError(f"invalid request: {where or 'body'}: {reason}") from None


def _oip_input(tensor: OipTensor, runtime: ModelRuntime, max_batch: int) -> torch.Tensor:
    expected = list(runtime.spec.input_shape[1:])
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != expected or not 1 <= shape[0] <= max_batch:
        raise ShapeMismatchError(
            f"input shape must be [N, {', '.join(map(str, expected))}] with 1 <= N <= "
            f"{max_batch}, got {shape}")
    try:
        x = torch.tensor(tensor.data, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ShapeMismatchError(f"input data is not a (nested) list of numbers: {exc}") from exc
    if x.numel() != math.prod(shape):
        raise ShapeMismatchError(
            f"input data has {x.numel()} values, shape {shape} needs {math.prod(shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ShapeMismatchError("input data contains NaN or infinity")
    return x.reshape(shape)


@contextmanager
def _track(service: Service) -> Iterator[dict[str, str]]:
    """Count the request by status. Handlers fill in model and split once they are resolved, so
    names a client made up are counted as '-' and can't blow up the label space."""
    labels = {"model": "-", "split": "-"}
    try:
        yield labels
    except Exception as exc:
        service.metrics.requests.labels(**labels, status=str(status_for(exc))).inc()
        raise
    service.metrics.requests.labels(**labels, status="200").inc()
