"""Split inference through the real wire path, compared with unsplit float32: the numbers
behind ``python -m bench fidelity``.

    rt = DeviceRuntime("efficientnet_lite0")
    fid = measure_fidelity(rt, evaluation_images(20), points=rt.points[6:9])
    fid.points[0].top1_agreement, fid.points[0].ratio     # (1.0, 0.2137...)

For every split point and image: head -> the exact frame the device sends (uint8 + zstd +
msgpack) -> decoded as the server decodes it -> tail. The ``cloud`` candidate (a JPEG of the
centre crop, the whole model in the cloud) goes through the server's image path. Pure: nothing
is written; ``bench.fidelity`` does the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from device_client.runtime import DeviceRuntime, EncodeOptions
from shared import wire
from shared.inbound import decode_frame
from shared.partition import SplitPoint
from shared.preprocess import center_crop, encode_jpeg, load_image, preprocess

__all__ = ["CloudFidelity", "Fidelity", "Int8Fidelity", "Int8Runtime", "PointFidelity",
           "measure_fidelity"]

JPEG_QUALITY = 90  # what the device's `cloud` candidate sends (device_client.pipeline)
# Images per head/tail/reference call. On the 2-core bench machine (efficientnet_lite0, float32)
# batches of 2-4 took 12-19 ms per image, 8 took 20-27 and 32 took 37: bigger batches push the
# 112x112 early maps out of cache. Batching changes float rounding only, never the bytes.
BATCH = 4
METHOD = (
    "Every image is encoded in its own frame, exactly as the device sends it (batch 1, "
    "its own quantization scales); bytes_per_image is the mean length of those frames, "
    "msgpack header included. Frames are decoded as the server does "
    "(shared.inbound.decode_frame); the decoded rows are then stacked so that the "
    f"float32 head, tail and reference run in batches of {BATCH}, which changes float "
    "rounding only (max ~3e-6 in the logits), not what crosses the wire."
)


@dataclass(frozen=True)
class PointFidelity:
    """One split point: how close split inference through the wire is to unsplit float32."""

    split: str
    index: int
    top1_agreement: float  # fraction of images whose top-1 class equals the reference's
    mean_abs_dlogit: float  # over images and classes
    max_abs_dlogit: float
    bytes_per_image: float  # mean length of a one-image frame
    float32_bytes: int
    per_channel: bool  # the first image's frame (a photo, in CLI runs) had per-channel scales
    per_channel_images: float  # fraction of frames with per-channel scales (auto decides per image)
    disagreeing: tuple[str, ...]  # names of images whose top-1 changed

    @property
    def ratio(self) -> float:
        return self.bytes_per_image / self.float32_bytes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "disagreeing": list(self.disagreeing)}


@dataclass(frozen=True)
class CloudFidelity:
    """The ``cloud`` candidate: the centre crop as JPEG, the whole model in the cloud."""

    top1_agreement: float
    mean_abs_dlogit: float
    max_abs_dlogit: float
    bytes_per_image: float  # mean JPEG length
    input_float32_bytes: int  # the float32 input tensor the JPEG stands in for
    jpeg_quality: int
    disagreeing: tuple[str, ...]

    @property
    def ratio(self) -> float:
        return self.bytes_per_image / self.input_float32_bytes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "disagreeing": list(self.disagreeing)}


class Int8Runtime(Protocol):
    """What the int8 rows need of a device runtime: ``OnnxDeviceRuntime(bundle, precision=
    "int8")`` (batch-1 numpy in, numpy out)."""

    def point(self, key: str | int) -> Any: ...
    def run_head(self, point: Any, x: np.ndarray) -> tuple[np.ndarray, ...]: ...
    def run_full(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Int8Fidelity:
    """An int8 head through the wire to the float32 tail (``split``), or the whole model in
    int8 (``split`` None), against unsplit float32."""

    split: str | None
    index: int | None
    top1_agreement: float
    mean_abs_dlogit: float
    max_abs_dlogit: float
    disagreeing: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "disagreeing": list(self.disagreeing)}


@dataclass(frozen=True)
class Fidelity:
    """The whole measurement: one ``PointFidelity`` per split point measured, plus ``cloud``."""

    model: str
    images: int
    granularity: str
    zstd_level: int
    points: tuple[PointFidelity, ...]
    cloud: CloudFidelity
    int8: tuple[Int8Fidelity, ...] = ()  # whole model first, then the points; () if not measured

    def to_json(self, command: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": self.model,
            "images": self.images,
            "granularity": self.granularity,
            "zstd_level": self.zstd_level,
            "method": METHOD,
            "points": [p.to_json() for p in self.points],
            "cloud": self.cloud.to_json(),
            "int8": [r.to_json() for r in self.int8],
            **extra,
            "command": command,
        }


def _compare(
    logits: torch.Tensor, ref: torch.Tensor, names: Sequence[str]
) -> tuple[float, float, float, tuple[str, ...]]:
    """Top-1 agreement, mean and max |delta logit|, and the images whose top-1 changed."""
    same = logits.argmax(dim=1) == ref.argmax(dim=1)
    diff = (logits - ref).abs()
    changed = tuple(n for n, s in zip(names, same.tolist(), strict=True) if not s)
    return float(same.double().mean()), float(diff.double().mean()), float(diff.max()), changed


def _server_decode(
    runtime: DeviceRuntime, frame: bytes, point: SplitPoint
) -> tuple[wire.Frame, tuple[torch.Tensor, ...]]:
    decoded = decode_frame(
        frame,
        model=runtime.name,
        fingerprint=runtime.fingerprint,
        split=point.name,
        expected=point.tensors,
        max_batch=1,
    )
    return decoded.frame, decoded.tensors


def _measure_point(
    runtime: DeviceRuntime,
    point: SplitPoint,
    batches: Sequence[torch.Tensor],
    ref: torch.Tensor,
    names: Sequence[str],
    options: EncodeOptions,
) -> PointFidelity:
    logits: list[torch.Tensor] = []
    sizes: list[int] = []
    per_channel: list[bool] = []
    for batch in batches:
        acts = runtime.run_head(point, batch)
        rows = []
        for i in range(batch.shape[0]):
            frame = runtime.encode(
                point, tuple(a[i : i + 1] for a in acts), f"fidelity-{len(sizes)}", options
            )
            sizes.append(len(frame))
            decoded, tensors = _server_decode(runtime, frame, point)
            per_channel.append(any(t.axis is not None for t in decoded.tensors))
            rows.append(tensors)
        logits.append(
            runtime.run_tail(point, tuple(torch.cat(col) for col in zip(*rows, strict=True)))
        )
    top1, mean, worst, changed = _compare(torch.cat(logits), ref, names)
    return PointFidelity(
        split=point.name,
        index=point.index,
        top1_agreement=top1,
        mean_abs_dlogit=mean,
        max_abs_dlogit=worst,
        bytes_per_image=sum(sizes) / len(sizes),
        float32_bytes=point.float32_bytes,
        per_channel=per_channel[0],
        per_channel_images=sum(per_channel) / len(per_channel),
        disagreeing=changed,
    )


def measure_fidelity(
    runtime: DeviceRuntime,
    images: Sequence[tuple[str, Image.Image]],
    *,
    points: Sequence[SplitPoint] | None = None,
    options: EncodeOptions | None = None,
    on_step: Callable[[str], None] | None = None,
    int8: Int8Runtime | None = None,
) -> Fidelity:
    """Measure ``points`` (default: all of them) and the ``cloud`` candidate on ``images``;
    with ``int8``, also its whole model and its head at each of ``points`` (through the wire to
    the float32 tail).

    ``on_step(label)`` is called after the reference/cloud step and after each split point
    (``len(points) + 1`` calls, and one per point more with ``int8``), for progress bars.
    ``images`` are ``(name, RGB image)``; ``PointFidelity.per_channel`` reports the first one's
    frame.
    """
    if not images:
        raise ValueError("measure_fidelity needs at least one image")
    points = list(runtime.points if points is None else points)
    options = options or EncodeOptions()
    pre = runtime.spec.preprocessing
    names = [name for name, _ in images]
    step = on_step or (lambda label: None)
    with torch.inference_mode():
        xs = [preprocess(img, pre) for _, img in images]
        batches = [torch.cat(xs[i : i + BATCH]) for i in range(0, len(xs), BATCH)]
        ref = torch.cat([runtime.run_full(b) for b in batches])
        cloud = _measure_cloud(runtime, images, ref, names)
        step("reference + cloud")
        results = []
        for point in points:
            results.append(_measure_point(runtime, point, batches, ref, names, options))
            step(point.name)
        int8_rows = []
        if int8 is not None:
            full = torch.cat([torch.from_numpy(int8.run_full(x.numpy())) for x in xs])
            int8_rows.append(Int8Fidelity(None, None, *_compare(full, ref, names)))
            for point in points:
                int8_rows.append(_measure_int8(runtime, int8, point, xs, ref, names, options))
                step(f"int8 {point.name}")
    return Fidelity(
        model=runtime.name,
        images=len(images),
        granularity=options.granularity,
        zstd_level=options.zstd_level,
        points=tuple(results),
        cloud=cloud,
        int8=tuple(int8_rows),
    )


def _measure_int8(
    runtime: DeviceRuntime,
    int8: Int8Runtime,
    point: SplitPoint,
    xs: Sequence[torch.Tensor],
    ref: torch.Tensor,
    names: Sequence[str],
    options: EncodeOptions,
) -> Int8Fidelity:
    # The int8 head runs at batch 1 as on the device; its frames are decoded as the server
    # does and the float32 tail runs in batches of BATCH, as in _measure_point.
    head_point = int8.point(point.index)
    rows = []
    for i, x in enumerate(xs):
        acts = tuple(torch.from_numpy(a) for a in int8.run_head(head_point, x.numpy()))
        frame = runtime.encode(point, acts, f"fidelity-{i}", options)
        rows.append(_server_decode(runtime, frame, point)[1])
    logits = [
        runtime.run_tail(point, tuple(torch.cat(col) for col in zip(*rows[i : i + BATCH],
                                                                   strict=True)))
        for i in range(0, len(rows), BATCH)
    ]
    return Int8Fidelity(point.name, point.index, *_compare(torch.cat(logits), ref, names))


def _measure_cloud(
    runtime: DeviceRuntime,
    images: Sequence[tuple[str, Image.Image]],
    ref: torch.Tensor,
    names: Sequence[str],
) -> CloudFidelity:
    pre = runtime.spec.preprocessing
    jpegs = [encode_jpeg(center_crop(img, pre), quality=JPEG_QUALITY) for _, img in images]
    # The server's path for an image body: load_image + preprocess (cloud_server.runtime).
    xs = [preprocess(load_image(j), pre) for j in jpegs]
    logits = torch.cat(
        [runtime.run_full(torch.cat(xs[i : i + BATCH])) for i in range(0, len(xs), BATCH)]
    )
    top1, mean, worst, changed = _compare(logits, ref, names)
    return CloudFidelity(
        top1_agreement=top1,
        mean_abs_dlogit=mean,
        max_abs_dlogit=worst,
        bytes_per_image=sum(map(len, jpegs)) / len(jpegs),
        input_float32_bytes=4 * xs[0].numel(),
        jpeg_quality=JPEG_QUALITY,
        disagreeing=changed,
    )
