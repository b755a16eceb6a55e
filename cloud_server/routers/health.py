"""Liveness, readiness and server metadata (Open Inference Protocol)."""

from __future__ import annotations

from fastapi import APIRouter, Security
from fastapi.responses import JSONResponse

from cloud_server.middleware import bearer
from cloud_server.service import ServiceDep
from shared.errors import NotReadyError
from shared.schemas import ErrorBody, LiveBody, ModelReady, ReadyBody, ServerMetadata

router = APIRouter(tags=["health"])

VERSION = "0.1.0"


@router.get("/v2/health/live", response_model=LiveBody)
async def live() -> LiveBody:
    """200 as soon as the process answers HTTP."""
    return LiveBody(live=True)


@router.get("/v2/health/ready", response_model=ReadyBody, response_model_exclude_none=True,
            responses={503: {"model": ReadyBody, "description": "Still loading models"}})
async def ready(service: ServiceDep) -> ReadyBody | JSONResponse:
    """200 once every model is loaded, warmed up and profiled; 503 until then."""
    if service.ready:
        return ReadyBody(ready=True)
    reason = service.load_error or "loading models"
    return JSONResponse({"ready": False, "error": reason}, status_code=503,
                        headers={"Retry-After": "2"})


@router.get("/v2", response_model=ServerMetadata, dependencies=[Security(bearer)])
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="splitserve", version=VERSION,
                          extensions=["split_inference", "image_classification"])


@router.get("/v2/models/{model}/ready", response_model=ModelReady,
            responses={404: {"model": ErrorBody}, 503: {"model": ModelReady}},
            dependencies=[Security(bearer)])
async def model_ready(model: str, service: ServiceDep
                      ) -> ModelReady | JSONResponse:
    try:
        service.runtime(model)
    except NotReadyError:
        return JSONResponse({"name": model, "ready": False}, status_code=503,
                            headers={"Retry-After": "2"})
    return ModelReady(name=model, ready=True)
