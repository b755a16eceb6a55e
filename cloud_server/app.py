"""The FastAPI application: routers, middleware, error handlers, and the lifespan that loads
models (in a background thread, so liveness answers while readiness says 503)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cloud_server.errors import install_error_handlers
from cloud_server.middleware import ActivityMiddleware, AuthMiddleware, BodyLimitMiddleware
from cloud_server.routers import bundle, docs, health, infer, metrics, models
from cloud_server.service import Loader, Service
from cloud_server.settings import Settings, get_settings
from cloud_server.warmup import warm_up
from shared.schemas import OipRequest

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, *, loader: Loader | None = None,
               freeze_heap: bool = False) -> FastAPI:
    """Build the app. ``loader(name, weights)`` replaces model loading in tests.
    ``freeze_heap``: once the models have loaded, keep what is alive out of the garbage
    collector's walks (``cloud_server.memory.freeze_heap``); for the process that serves the
    app and nothing else (``python -m cloud_server``, a Ray Serve replica), not for a test
    process that builds many apps.

        >>> app = create_app(Settings(models=("resnet18",)))
    """
    settings = settings or get_settings()
    service = Service(settings, loader, freeze_heap=freeze_heap)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        keys = [k.get_secret_value() for k in settings.api_keys]
        await warm_up(app, api_key=keys[0] if keys else None)
        try:
            yield
        finally:
            await service.stop()

    # FastAPI's /docs and /redoc load Swagger UI and ReDoc from a CDN: a third party's scripts
    # on the service's origin. docs.py serves a self-contained page instead.
    app = FastAPI(title="splitserve", version=health.VERSION, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Split inference: the device runs the head of a vision model, "
                              "this service runs the tail.")
    app.state.service = service
    app.state.bundle_shelf = bundle.BundleShelf(bundle.service_prepare(settings))
    for module in (health, models, bundle, infer, metrics, docs):
        app.include_router(module.router)
    install_error_handlers(app)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    # Added last runs first: activity, auth, then the body limit, then the app.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.request_timeout_s)
    app.add_middleware(AuthMiddleware,
                       api_keys=[k.get_secret_value() for k in settings.api_keys])
    app.add_middleware(ActivityMiddleware, enter=service.trimmer.enter,
                       exit=service.trimmer.exit)
    return app


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 for every route with parameters; this service answers bad
    parameters with 400 and ``{"error": ...}`` (see errors.py), so the schema says that."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {"description": "Invalid request",
                                        "content": {"application/json": {"schema": {
                                            "$ref": "#/components/schemas/ErrorBody"}}}}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        # The OIP route reads its body itself (see routers/infer.py); its schema still belongs.
        oip = OipRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(oip.pop("$defs", {}))
        components["OipRequest"] = oip
        app.openapi_schema = schema
    return app.openapi_schema
