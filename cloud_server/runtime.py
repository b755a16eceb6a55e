"""One served model: its weights, its split points, the backend that runs its tails, and measured
costs."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cloud_server.backend import BACKENDS, Backend
from cloud_server.backend_torch import TorchBackend
from cloud_server.costs import ServerCosts
from shared import codec_torch, wire
from shared.candidates import WHOLE_MODEL
from shared.errors import BundleMismatchError, ConfigError
from shared.inbound import decode_frame
from shared.models import ModelSpec, fingerprint, get_model, get_spec, imagenet_labels
from shared.partition import Partitioner, SplitPoint
from shared.preprocess import (
    UPLOAD_FORMATS,
    ImageHeader,
    center_crop,
    encode_jpeg,
    load_image,
    preprocess,
    read_header,
    reference_photo,
)
from shared.timing import median_ms

__all__ = ["ModelRuntime", "keep_freed_memory", "load_runtime"]

log = logging.getLogger("cloud_server")

# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD_BYTES = 256 * 2**20
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


@dataclass
class ModelRuntime:
    """Everything the service needs to answer for one model. Built once, in the loader thread."""

    name: str
    spec: ModelSpec
    fingerprint: str
    labels: tuple[str, ...]
    points: list[SplitPoint]
    backend: Backend  # runs the tails and the whole model (cloud_server.backend)
    partitioner: Partitioner
    # Decode + compute of a lone request, per split point name and for WHOLE_MODEL: profiled at
    # start-up, kept current by live traffic (cloud_server/costs.py).
    costs: ServerCosts = field(default_factory=ServerCosts, repr=False)

    @property
    def server_ms(self) -> dict[str, float]:
        """What a lone request for each split point (and WHOLE_MODEL) costs now, in ms."""
        return self.costs.figures()

    def point(self, key: str) -> SplitPoint:
        """A split point by name or index; raises UnknownSplitPointError."""
        return self.partitioner.point(key)

    def decode_frame(self, body: bytes, point: SplitPoint, *, max_frame_bytes: int,
                     max_batch: int) -> tuple[wire.Frame, tuple[torch.Tensor, ...], int]:
        """Parse and check a frame for ``point`` and dequantize its tensors
        (``shared.inbound.decode_frame``)."""
        decoded = decode_frame(body, model=self.name, fingerprint=self.fingerprint,
                               split=point.name, expected=point.tensors,
                               max_frame_bytes=max_frame_bytes, max_batch=max_batch)
        return decoded.frame, decoded.tensors, decoded.rows

    def image_header(self, body: bytes, *, max_decoded_bytes: int | None = None
                     ) -> ImageHeader:
        """The header of an upload (JPEG, PNG or WebP only), sized as ``decode_image`` with the
        same budget decodes it."""
        return read_header(body, formats=UPLOAD_FORMATS, max_decoded_bytes=max_decoded_bytes,
                           min_side=self.spec.preprocessing.resize_size)

    def decode_image(self, body: bytes, *, max_decoded_bytes: int | None = None
                     ) -> torch.Tensor:
        """An encoded image (JPEG, PNG or WebP) to a normalized ``(1, 3, H, W)`` input, in at
        most ``max_decoded_bytes`` of decoded pixels (see ``shared.preprocess.load_image``)."""
        pre = self.spec.preprocessing
        image = load_image(body, formats=UPLOAD_FORMATS, max_decoded_bytes=max_decoded_bytes,
                           min_side=pre.resize_size)
        return preprocess(image, pre)

    def run(self, key: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run the tail of split point ``key``, or the whole model for WHOLE_MODEL, with the
        runtime's backend."""
        return self.backend.run(key, inputs)

    def observe(self, key: str, *, decode_ms: float, compute_ms: float, alone: bool) -> None:
        """Fold one answered request's decode and compute per row into the published figures;
        ``alone``: its forward pass held no other request (``ServerCosts.observe``)."""
        self.costs.observe(key, decode_ms=decode_ms, compute_ms=compute_ms, alone=alone)

    def profile(self, repeats: int) -> None:
        """Measure decode + tail at batch 1 for every split point, and decode + whole model.

        Inputs are the model's own activations on a real photo, encoded as the device would, so
        decode time includes real zstd work.
        """
        if repeats < 1:
            return
        image = center_crop(reference_photo(), self.spec.preprocessing)
        x = preprocess(image, self.spec.preprocessing)
        jpeg = encode_jpeg(image)

        # Decode and compute apart: live traffic moves them differently (cloud_server/costs.py).
        x_jpeg = self.decode_image(jpeg)
        decode_ms = {WHOLE_MODEL: median_ms(lambda: self.decode_image(jpeg), repeats=repeats)}
        compute_ms = {WHOLE_MODEL: median_ms(lambda: self.run(WHOLE_MODEL, (x_jpeg,)),
                                             repeats=repeats)}
        for point in self.points:
            head, _ = self.partitioner.split(point)
            with torch.inference_mode():
                acts = head(x)
            frame = wire.encode(wire.Frame(
                model=self.name, fingerprint=self.fingerprint, split=point.name,
                request_id="profile", tensors=tuple(codec_torch.encode_tensor(a) for a in acts)))

            def decode(frame: bytes = frame, point: SplitPoint = point
                       ) -> tuple[torch.Tensor, ...]:
                return self.decode_frame(frame, point, max_frame_bytes=len(frame) + 1,
                                         max_batch=1)[1]

            def compute(name: str = point.name, inputs: tuple[torch.Tensor, ...] = decode()
                        ) -> None:
                self.run(name, inputs)

            decode_ms[point.name] = median_ms(decode, repeats=repeats)
            compute_ms[point.name] = median_ms(compute, repeats=repeats)
        self.costs.set_profile(decode_ms=decode_ms, compute_ms=compute_ms)


def keep_freed_memory() -> bool:
    """Make glibc keep the memory of freed tensors for the next forward pass instead of handing
    it back to the kernel; returns whether it took effect (False off glibc, or when the operator
    set ``MALLOC_*_`` / ``GLIBC_TUNABLES`` malloc settings, which win).

    A forward pass allocates and frees tens of MB of activations. glibc's defaults return them:
    blocks over the mmap threshold are mmap()ed and munmap()ed every time, and free space at the
    top of a heap above the trim threshold is trimmed. The next pass then page-faults all of it
    back in, zero-filled. Measured on the benchmark's tail (``python -m bench service``): 500-1,100
    minor faults per sample, and a third of the forward pass spent in the kernel; with these
    settings 10-25 faults and 40-50% more samples per second. The cost: during a burst the
    process keeps its peak heap rather than shrinking between batches, as any caching allocator
    does; the service's ``IdleTrimmer`` (memory.py) hands it back once the burst is over.
    Process-wide, so call it once at start-up (``load_runtime`` does).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc." in tunables:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either one also turns off glibc's dynamic mmap threshold, which would otherwise
    # creep up only as far as the largest block freed so far.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


def load_runtime(name: str, weights: str | None = None, *, profile_repeats: int = 5,
                 backend: str = "torch", threads: int = 1, bundle_root: Path | None = None,
                 bundle_int8: bool = False) -> ModelRuntime:
    """Build the model, trace it, make the ``backend`` that runs its tails, warm up and profile.
    Also tunes the allocator for repeated forward passes (``keep_freed_memory``).

    ``torch``: a tail for every split point from the fx partition. ``onnxruntime``: the bundle of
    these weights under ``bundle_root`` (``cloud_server.bundles.service_bundle``: exported from
    the same partition on first use, then reused), run with ``threads`` intra-op threads;
    ``bundle_int8`` also puts int8 graphs in it, for the devices that download it.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if not keep_freed_memory():
        log.info("malloc left at its defaults (not glibc, or MALLOC_* set by the environment)")
    spec = get_spec(name)
    model = get_model(name, weights=weights)
    example = torch.zeros(spec.input_shape)
    part = Partitioner(model, example)
    points = part.points
    fp = fingerprint(model)
    engine: Backend
    if backend == "onnxruntime":
        engine = _onnx_backend(name, fp, weights, points, threads=threads, root=bundle_root,
                               int8=bundle_int8)
    else:
        engine = TorchBackend(model, {p.name: part.split(p)[1] for p in points})
    labels = imagenet_labels() if spec.num_classes == 1000 else tuple(
        f"class {i}" for i in range(spec.num_classes))
    runtime = ModelRuntime(name=name, spec=spec, fingerprint=fp, labels=labels, points=points,
                           backend=engine, partitioner=part)
    runtime.profile(profile_repeats)
    log.info("loaded %s (weights %s, %s): %d split points", name, runtime.fingerprint,
             engine.name, len(points))
    return runtime


def _onnx_backend(name: str, fp: str, weights: str | None, points: list[SplitPoint], *,
                  threads: int, root: Path | None, int8: bool) -> Backend:
    from cloud_server.backend_onnx import OnnxBackend  # onnxruntime: only for this backend
    from cloud_server.bundles import service_bundle

    bundle = service_bundle(name, fp, weights=weights, root=root, int8=int8)
    exported = [(p.name, p.index) for p in bundle.points]
    if exported != [(p.name, p.index) for p in points]:
        raise BundleMismatchError(f"bundle {bundle.root} has other split points than the "
                                  f"partition of {name}: export it again")
    return OnnxBackend(bundle, threads=threads)

