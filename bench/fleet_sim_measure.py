"""Service times for the fleet simulation, measured in this process with the service's backend.

    times = measure_service_times("efficientnet_lite0", ["cloud", "_blocks.9"], cpus={0})

For each candidate and batch size in ``BATCH_SIZES`` (others are interpolated), the forward
pass the service's compute thread runs (``cloud_server.runtime.load_runtime(...).run``: ONNX
Runtime by default, one intra-op thread, pinned to one core with ``bench.service_compute.pinned``
as the service is in the fleet run), and apart from it each request's decode, which the service
runs per request beside the batch: the JPEG decode + resize + crop for ``cloud``
(``ModelRuntime.decode_image``), the frame's unpack + dequantize for a split
(``ModelRuntime.decode_frame``). Cached as JSON, keyed by model, backend, threads and candidates.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.fleet_sim_inputs import ServiceTimes
from bench.service_compute import encode_frames, pinned, server_inputs
from device_client.runtime import DeviceRuntime
from device_client.samples import sample_photos
from shared.candidates import CLOUD, DEVICE
from shared.preprocess import center_crop, encode_jpeg

__all__ = ["BATCH_SIZES", "cached_service_times", "measure_service_times"]

BATCH_SIZES = (1, 2, 4, 8, 16)
SAMPLES = 25  # forward passes per (candidate, batch size): a distribution, not just a mean
CACHE_NAME = "fleet_sim_service_times.json"


def measure_service_times(model: str, candidates: Iterable[str], *, cpus: set[int],
                          backend: str = "onnxruntime", threads: int = 1,
                          batch_sizes: Iterable[int] = BATCH_SIZES,
                          samples: int = SAMPLES) -> ServiceTimes:
    """Measure every candidate (``device`` is skipped: the service never runs it)."""
    from cloud_server.runtime import load_runtime
    from cloud_server.settings import Settings

    served = load_runtime(model, profile_repeats=0, backend=backend, threads=threads,
                          bundle_root=Settings().bundle_root())
    device = DeviceRuntime(model)
    photos = sample_photos()
    decode_ms: dict[str, float] = {}
    batches: dict[tuple[str, int], Callable[[], object]] = {}
    sizes = sorted(set(batch_sizes))
    with pinned(cpus, threads=threads):
        for cand in candidates:
            if cand == DEVICE:
                continue
            calls: list[Callable[[], object]]
            rows: list[tuple[torch.Tensor, ...]]
            if cand == CLOUD:
                jpegs = [encode_jpeg(center_crop(img, served.spec.preprocessing))
                         for img in photos.values()]
                calls = [functools.partial(served.decode_image, j) for j in jpegs]
                rows = [(served.decode_image(j),) for j in jpegs]
            else:
                point = device.point(cand)
                frames = encode_frames(device, point, photos)
                calls = [functools.partial(served.decode_frame, f.body, served.point(cand),
                                           max_frame_bytes=len(f.body), max_batch=1)
                         for f in frames]
                rows = server_inputs(device, point, frames)
            decode_ms[cand] = _median_ms(calls)
            for b in sizes:
                batches[cand, b] = _batch_call(functools.partial(served.run, cand), rows, b)
        # Rounds over every (candidate, batch size): a burst of load from elsewhere on the
        # machine then lands on all of them alike, not on whichever was being measured.
        times: dict[tuple[str, int], list[float]] = {k: [] for k in batches}
        for _ in range(samples):
            for key, call in batches.items():
                started = time.perf_counter()
                call()
                times[key].append(round((time.perf_counter() - started) * 1e3, 3))
    batch_ms: dict[str, dict[int, tuple[float, ...]]] = {}
    for (cand, b), xs in times.items():
        batch_ms.setdefault(cand, {})[b] = tuple(xs)
    return ServiceTimes(batch_ms, decode_ms, 0.0)


def cached_service_times(model: str, candidates: list[str], cache_dir: Path, *,
                         cpus: set[int] | None = None, backend: str = "onnxruntime",
                         threads: int = 1) -> ServiceTimes:
    """``measure_service_times``, reusing ``cache_dir/CACHE_NAME`` when it holds the same key."""
    wanted = sorted(c for c in candidates if c != DEVICE)
    key: dict[str, object] = {"model": model, "backend": backend, "threads": threads,
                              "candidates": wanted}
    path = cache_dir / CACHE_NAME
    if path.exists():
        cached: dict[str, Any] = json.loads(path.read_text())
        if cached.get("key") == key:
            return ServiceTimes.from_json(cached["service_ms"], decode_ms=cached["decode_ms"])
    times = measure_service_times(model, wanted, backend=backend, threads=threads,
                                  cpus=cpus if cpus is not None else {min(os.sched_getaffinity(0))})
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, **times.to_json()}, indent=1) + "\n")
    return times


def _median_ms(calls: list[Callable[[], object]], repeats: int = 5) -> float:
    for call in calls:  # warm-up
        call()
    times = []
    for _ in range(repeats):
        for call in calls:
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _batch_call(run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
                rows: Sequence[tuple[torch.Tensor, ...]], size: int) -> Callable[[], object]:
    """``run`` on ``size`` rows (cycled) stacked into one batch, warmed up."""
    picked = [rows[i % len(rows)] for i in range(size)]
    batch = tuple(torch.cat(parts) for parts in zip(*picked, strict=True))
    for _ in range(2):  # warm-up: allocator growth, lazy kernel choice
        run(batch)
    return functools.partial(run, batch)
