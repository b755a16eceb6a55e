"""The service's state: loaded models, the batcher and the metrics, shared by every router."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Annotated, cast

import torch
from fastapi import Depends, Request

from cloud_server.batching import Batcher, BatchResult
from cloud_server.memory import IdleTrimmer, ImageBudget, freeze_heap
from cloud_server.metrics import Metrics
from cloud_server.runtime import ModelRuntime, load_runtime
from cloud_server.settings import Settings
from shared.candidates import WHOLE_MODEL
from shared.errors import NotReadyError, OverloadedError, UnknownModelError
from shared.schemas import LoadBody

__all__ = ["Loader", "Service", "ServiceDep", "get_service"]

log = logging.getLogger("cloud_server")

Loader = Callable[[str, str | None], ModelRuntime]
_QUEUE_EWMA_ALPHA = 0.1


class Service:
    """Loads models in a background thread, so liveness answers at once and readiness says 503
    until every model is loaded, warmed up and profiled."""

    def __init__(self, settings: Settings, loader: Loader | None = None, *,
                 freeze_heap: bool = False) -> None:
        self.settings = settings
        self.freeze_heap = freeze_heap  # after loading: memory.freeze_heap
        self.runtimes: dict[str, ModelRuntime] = {}
        self.load_error: str | None = None
        self.queue_ms = 0.0
        self.decoding = 0  # requests admitted, their bodies being read and decoded
        self._ready = threading.Event()
        self._loader = loader or (lambda name, weights: load_runtime(
            name, weights, profile_repeats=settings.profile_repeats, backend=settings.backend,
            threads=settings.torch_threads(), bundle_root=settings.bundle_root(),
            bundle_int8=settings.bundle_int8))
        self.batcher = Batcher(self._run, max_batch_size=settings.max_batch_size,
                               max_queue_delay_ms=settings.max_queue_delay_ms,
                               max_queue=settings.max_queue, on_batch=self._on_batch,
                               incoming=lambda: self.decoding)
        self.metrics = Metrics(queue_depth=lambda: self.batcher.depth)
        self.image_budget = ImageBudget(settings.image_memory_budget_bytes)
        self.trimmer = IdleTrimmer(settings.trim_idle_s)
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        torch.set_num_threads(self.settings.torch_threads())
        await self.batcher.start()
        self.trimmer.start()
        self._thread = threading.Thread(target=self._load_all, name="loader", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        await self.trimmer.stop()
        await self.batcher.stop()

    def _load_all(self) -> None:
        started = time.perf_counter()
        try:
            for name, weights in self.settings.model_weights().items():
                self.runtimes[name] = self._loader(name, weights)
        except Exception as exc:  # reported by /v2/health/ready; the process stays up to say so
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading models failed: %s", self.load_error)
            return
        if self.freeze_heap:  # before the first request (memory.freeze_heap says why)
            self.metrics.frozen_objects.set(freeze_heap())
        self._ready.set()
        log.info("ready in %.1f s: %s", time.perf_counter() - started, ", ".join(self.runtimes))

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def runtime(self, name: str) -> ModelRuntime:
        """The runtime of a served model: UnknownModelError (404) or NotReadyError (503)."""
        if name not in self.settings.model_weights():
            served = ", ".join(self.settings.model_weights())
            raise UnknownModelError(f"no model {name!r}; this service serves {served}")
        runtime = self.runtimes.get(name)
        if runtime is None or not self.ready:
            raise NotReadyError(f"model {name!r} is still loading", retry_after_s=2.0)
        return runtime

    def admit(self) -> None:
        """Refuse at once when the queue is full: before the body is read and decoded, so a
        rejected request costs next to nothing. ``submit`` checks again (the body takes time)."""
        if self.batcher.depth >= self.settings.max_queue:
            raise OverloadedError(f"queue full ({self.settings.max_queue} requests waiting)",
                                  retry_after_s=self.batcher.retry_after_s())

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """``admit()``, then count the request as on its way to the batcher until the block
        ends: wrap the body read and decode, and submit after it. The batcher waits for a batch
        to fill only while some request is on its way (see batching.py)."""
        self.admit()
        self.decoding += 1
        try:
            yield
        finally:
            self.decoding -= 1

    async def submit(self, runtime: ModelRuntime, key: str, inputs: tuple[torch.Tensor, ...],
                     *, timeout_s: float) -> BatchResult:
        result = await self.batcher.submit((runtime.name, key), inputs, timeout_s=timeout_s)
        self.queue_ms += _QUEUE_EWMA_ALPHA * (result.queue_ms - self.queue_ms)
        labels = {"model": runtime.name, "split": key}
        self.metrics.queue_seconds.labels(**labels).observe(result.queue_ms / 1e3)
        return result

    def load(self, runtime: ModelRuntime) -> LoadBody:
        """The ``load`` of answers and metadata: the expected wait of a request for ``runtime``
        sent now, for the whole model and for each tail (``Batcher.wait_ms``)."""
        def row_ms(key: Hashable) -> float | None:  # a queued key the batcher has not run
            model, split = cast(tuple[str, str], key)
            rt = self.runtimes.get(model)
            return None if rt is None else rt.costs.figure(split)

        wait = self.batcher.wait_ms(row_ms)
        own = {cast(tuple[str, str], key)[1]: ms for key, ms in wait.extra_ms.items()
               if cast(tuple[str, str], key)[0] == runtime.name}
        return LoadBody(
            queue_ms_whole=round(wait.shared_ms + own.pop(WHOLE_MODEL, 0.0), 1),
            queue_ms_tail=round(wait.shared_ms, 1),
            queue_ms_splits={split: round(wait.shared_ms + ms, 1)
                             for split, ms in sorted(own.items()) if ms >= 0.05},
            queued=wait.queued)

    def _run(self, key: Hashable, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        model, split = cast(tuple[str, str], key)
        return self.runtimes[model].run(split, inputs)

    def _on_batch(self, key: Hashable, size: int, compute_s: float) -> None:
        model, split = cast(tuple[str, str], key)
        self.metrics.compute_seconds.labels(model=model, split=split).observe(compute_s)
        self.metrics.batch_size.labels(model=model, split=split).observe(size)


async def get_service(request: Request) -> Service:
    """FastAPI dependency: the app's Service. Async so FastAPI doesn't hop to a thread for it."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]

