"""The service as a Ray Serve application: ``serve run cloud_server.serve:app``.

Needs the ``ray`` extra (``pip install '.[ray]'``). Each replica is one Ray actor that builds the
same FastAPI app as ``python -m cloud_server`` (``create_app``) and serves it through Serve's
FastAPI ingress: the same routers, runtime, batching and metrics. Serve runs the app's lifespan
inside the replica, so every replica loads (and profiles) its own models, and its health check
keeps the proxy away from it until they are loaded.

Settings come from ``SPLITSERVE_*`` in the replica's environment: ``runtime_env.env_vars`` in
``deploy/serve.yaml``, or the environment ``ray start`` ran in. The app is built by a function
that Serve calls in the replica, so the driver that deploys never loads a model.

``/metrics`` through the Serve proxy is the metrics of whichever replica answered, not a sum
over replicas: scrape each replica, or use Ray's own metrics, for the fleet's totals.

    >>> app.__class__.__name__
    'Application'
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI
from ray import serve

from cloud_server.app import create_app
from cloud_server.service import Service
from cloud_server.settings import Settings
from shared.errors import SplitServeError

__all__ = ["DEPLOYMENT_NAME", "SplitServe", "app", "build_app"]

DEPLOYMENT_NAME = "SplitServe"


def _build_fastapi_app() -> FastAPI:
    # Called in the replica: Settings() reads the replica's SPLITSERVE_* environment.
    return create_app(Settings(), freeze_heap=True)  # the replica's process is the app's


LOAD_WAIT_S = 900.0  # the longest a replica may take to load its models before Serve gives up


class _Replica:
    """What Serve calls besides HTTP: the health check.

    Serve runs one check when a replica starts, before the proxy routes to it, and then every
    ``health_check_period_s``; a replica that fails one is replaced. The first waits for the
    models (loaded by the app's lifespan in a thread), so no request reaches a replica that
    would answer 503 while loading; a load that failed fails the check."""

    async def check_health(self) -> None:
        # ASGIAppReplicaWrapper (the ingress) keeps the app as ``self.app``.
        service: Service = getattr(self, "app").state.service  # noqa: B009
        deadline = time.monotonic() + LOAD_WAIT_S
        while not service.ready:
            if service.load_error is not None:
                raise SplitServeError(f"loading models failed: {service.load_error}")
            if time.monotonic() > deadline:
                raise SplitServeError(f"models not loaded after {LOAD_WAIT_S:.0f} s")
            await asyncio.sleep(0.2)


SplitServe = serve.deployment(
    name=DEPLOYMENT_NAME,
    # Room for a burst: the service's own queue (SPLITSERVE_MAX_QUEUE) answers 503 beyond it.
    max_ongoing_requests=64,
    # Loading and profiling the models took 110 s on 2 busy cores (see the Dockerfile).
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=30,
)(serve.ingress(_build_fastapi_app)(_Replica))

app = SplitServe.bind()


def build_app(args: dict[str, Any]) -> Any:
    """An application builder for ``serve run cloud_server.serve:build_app num_replicas=2``:
    ``num_replicas`` and ``num_cpus`` from the command line, everything else from the
    environment."""
    options: dict[str, Any] = {}
    if "num_replicas" in args:
        options["num_replicas"] = int(args["num_replicas"])
    if "num_cpus" in args:
        options["ray_actor_options"] = {"num_cpus": float(args["num_cpus"])}
    return SplitServe.options(**options).bind()
