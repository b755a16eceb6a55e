"""The FastAPI application: routers, middleware, error handlers, and the lifespan that loads
models (in a background thread, so liveness answers while readiness says 503)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cloud_server.errors import install_error_handlers
from cloud_server.middleware import AuthMiddleware, BodyLimitMiddleware
from cloud_server.routers import health, infer, metrics, models
from cloud_server.service import Loader, Service
from cloud_server.settings import Settings, get_settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, *, loader: Loader | None = None) -> FastAPI:
    """Build the app. ``loader(name, weights)`` replaces model loading in tests.

        >>> app = create_app(Settings(models=("resnet18",)))
    """
    settings = settings or get_settings()
    service = Service(settings, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="splitserve", version=health.VERSION, lifespan=lifespan,
                  description="Split inference: the device runs the head of a vision model, "
                              "this service runs the tail.")
    app.state.service = service
    for module in (health, models, infer, metrics):
        app.include_router(module.router)
    install_error_handlers(app)
    # Added last runs first: auth, then the body limit, then the app.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.request_timeout_s)
    app.add_middleware(AuthMiddleware,
                       api_keys=[k.get_secret_value() for k in settings.api_keys])
    return app
