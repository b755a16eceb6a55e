"""The torch side of ``bench service``: the frames the clients send, and raw batched compute.

    runtime = DeviceRuntime("efficientnet_lite0")
    point = runtime.middle_point()
    frames = encode_frames(runtime, point, sample_photos())
    served = load_runtime("efficientnet_lite0", profile_repeats=0)  # the service's tails
    with pinned({0}, threads=1):
        rps = raw_compute_rps(lambda x: served.run(point.name, x),
                              server_inputs(runtime, point, frames), batch_size=16, seconds=5)

Frames are encoded once, before any load runs, so the load generator does no torch work. The
expected answer for a frame is the top-1 class of the same tail run locally on the frame's
dequantized tensors: exactly what the service computes, so a correct service always matches it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from PIL import Image

from bench.service_load import LoadFrame
from device_client.runtime import DeviceRuntime
from shared.inbound import decode_frame
from shared.partition import SplitPoint
from shared.predictions import top_k
from shared.preprocess import preprocess

__all__ = [
    "CpuLayout",
    "cpu_layout",
    "encode_frames",
    "pinned",
    "raw_compute_rps",
    "server_inputs",
]


def encode_frames(
    runtime: DeviceRuntime, point: SplitPoint, photos: Mapping[str, Image.Image]
) -> list[LoadFrame]:
    """One frame per photo (head at ``point``, encoded as the device sends it), with the top-1
    class of the local tail on what the service will decode."""
    frames = []
    for name, image in photos.items():
        x = preprocess(image, runtime.spec.preprocessing)
        body = runtime.encode(point, runtime.run_head(point, x), request_id=f"bench-{name}")
        logits = runtime.run_tail(point, _server_decode(runtime, point, body))
        expected = top_k(logits, runtime.labels, 1)[0][0].index
        frames.append(LoadFrame(name, body, expected))
    return frames


def server_inputs(
    runtime: DeviceRuntime, point: SplitPoint, frames: Sequence[LoadFrame]
) -> list[tuple[torch.Tensor, ...]]:
    """The tensors the service's tail runs on for each frame, decoded as the service does."""
    return [_server_decode(runtime, point, f.body) for f in frames]


def _server_decode(
    runtime: DeviceRuntime, point: SplitPoint, body: bytes
) -> tuple[torch.Tensor, ...]:
    return decode_frame(
        body,
        model=runtime.name,
        fingerprint=runtime.fingerprint,
        split=point.name,
        expected=point.tensors,
    ).tensors


def raw_compute_rps(
    run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
    inputs: Sequence[tuple[torch.Tensor, ...]],
    *,
    batch_size: int,
    seconds: float,
) -> float:
    """Samples per second of ``run`` (the service's own tail: ``ModelRuntime.run``) alone, on
    already-decoded ``inputs`` (``server_inputs``) stacked into batches of ``batch_size`` rows
    (cycled): the ceiling the service's batched throughput is measured against. Runs in this
    process with its current affinity and torch thread count (see ``pinned``)."""
    rows = [inputs[i % len(inputs)] for i in range(batch_size)]
    batch = tuple(torch.cat(parts) for parts in zip(*rows, strict=True))
    for _ in range(3):  # warm-up: allocator growth, lazy kernel choice
        run(batch)
    runs = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 3:
        run(batch)
        runs += 1
    return runs * batch_size / elapsed


@contextmanager
def pinned(cpus: set[int], *, threads: int) -> Iterator[None]:
    """Run the block on ``cpus`` with ``threads`` torch threads, then restore both."""
    old_cpus = os.sched_getaffinity(0)
    old_threads = torch.get_num_threads()
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        os.sched_setaffinity(0, old_cpus)


class CpuLayout:
    """Which cores the service gets and which the load generator gets.

    ``isolated`` (on two or more cores): the load generator gets the last core to itself and the
    service all the others, each pinned, so the client's work never preempts the service and
    the raw-compute ceiling runs on exactly the service's cores. ``shared``: both may use every
    core; the client, a light asyncio process, then costs the service a little (recorded as
    ``client_cpu_ms_per_answer``). One core is always shared.
    """

    def __init__(self, service: set[int], client: set[int]) -> None:
        if not service or not client:
            raise ValueError("the service and the client need at least one core each")
        self.service = service
        self.client = client

    @property
    def shared(self) -> bool:
        return bool(self.service & self.client)

    def describe(self) -> dict[str, object]:
        return {
            "service_cpus": sorted(self.service),
            "client_cpus": sorted(self.client),
            "shared": self.shared,
        }


def cpu_layout(available: set[int] | None = None, *, isolated: bool = True) -> CpuLayout:
    """Split ``available`` cores (default: this process's affinity) as ``CpuLayout`` says."""
    cpus = sorted(available if available is not None else os.sched_getaffinity(0))
    if len(cpus) < 2 or not isolated:
        return CpuLayout(set(cpus), set(cpus))
    return CpuLayout(set(cpus[:-1]), {cpus[-1]})
