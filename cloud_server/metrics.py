"""Prometheus metrics, in base units (seconds, bytes), on a registry per app.

A registry per app rather than the global one, so tests can build many apps in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

# Sub-millisecond decode up to multi-second overload: 100 us .. 10 s.
_SECONDS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Every metric the service exports. ``queue_depth`` reads the batcher when scraped."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "splitserve_requests", "Inference requests answered, by model, split point and status",
            ["model", "split", "status"], registry=r)
        self.decode_seconds = Histogram(
            "splitserve_decode_seconds", "Time to parse, check and dequantize a request",
            ["model", "split"], buckets=_SECONDS, registry=r)
        self.queue_seconds = Histogram(
            "splitserve_queue_seconds", "Time a request waited for its batch",
            ["model", "split"], buckets=_SECONDS, registry=r)
        self.compute_seconds = Histogram(
            "splitserve_compute_seconds", "Forward-pass time of a batch",
            ["model", "split"], buckets=_SECONDS, registry=r)
        self.batch_size = Histogram(
            "splitserve_batch_size", "Requests per forward pass", ["model", "split"],
            buckets=_BATCH, registry=r)
        self.received_bytes = Counter(
            "splitserve_received_bytes", "Request body bytes received by inference endpoints",
            ["model", "split"], registry=r)
        self.bundle_requests = Counter(
            "splitserve_bundle_requests", "Bundle downloads by model and status (200 sent, "
            "304 the device's copy was current, 503 still being exported)",
            ["model", "status"], registry=r)
        self.frozen_objects = Gauge(
            "splitserve_gc_frozen_objects", "Objects alive once the models loaded, moved out "
            "of the garbage collector's reach (gc.freeze)", registry=r)
        self.queue_depth = Gauge(
            "splitserve_queue_depth", "Requests waiting for a forward pass", registry=r)
        self.queue_depth.set_function(queue_depth)
