"""The model on the device, on ONNX Runtime: an exported bundle, run on numpy arrays.

The same shape of API as ``device_client.runtime.DeviceRuntime`` (``points``, ``point``,
``middle_point``, ``run_full``, ``run_head``, ``run_tail``, ``encode``), with numpy arrays where
that one takes torch tensors. Importing and running it loads no torch; ``encode`` goes through
``shared.codec``'s numpy encoder.

    rt = OnnxDeviceRuntime("bundles/efficientnet_lite0", precision="int8", threads=1)
    point = rt.point("_blocks.8")
    frame = rt.encode(point, rt.run_head(point, x), request_id="r1")
    logits = rt.run_tail(point, rt.run_head(point, x))      # the fallback, all local
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from shared import codec, wire
from shared.bundle import Bundle, BundlePoint, load_bundle
from shared.errors import ConfigError
from shared.ortsession import open_session
from shared.preprocess import to_array

if TYPE_CHECKING:
    from device_client.runtime import EncodeOptions

__all__ = ["OnnxDeviceRuntime", "Precision"]

Precision = Literal["fp32", "int8"]


class OnnxDeviceRuntime:
    """One model as the device holds it, from a bundle. Heads run at ``precision``; tails (the
    fallback) are float32, as the service runs them. Sessions open on first use and stay open.

    ``bundle`` is a ``Bundle`` or its directory; ``model`` and ``fingerprint``, when given, must
    match the bundle's (``BundleMismatchError`` otherwise).
    """

    kind = "onnx"  # the runtime, as profiles record it

    def __init__(self, bundle: Bundle | str | os.PathLike[str], *, precision: Precision = "fp32",
                 threads: int = 1, model: str | None = None,
                 fingerprint: str | None = None) -> None:
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, model=model, fingerprint=fingerprint)
        if precision not in bundle.manifest.precisions:
            raise ConfigError(f"the bundle has no {precision} graphs (it has "
                              f"{', '.join(bundle.manifest.precisions)}); export it with --int8")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
        self.bundle = bundle
        self.precision: Precision = precision
        self.threads = threads
        manifest = bundle.manifest
        self.name = manifest.model
        self.fingerprint = manifest.fingerprint
        self.labels = manifest.labels
        # What DeviceRuntime.spec.preprocessing is; shared.preprocess.to_array takes it.
        self.preprocessing = manifest.preprocessing
        self.input_shape = manifest.input.shape
        self._input = manifest.input.name
        self._output = manifest.output.name
        self._sessions: dict[str, Any] = {}
        self.run_full(np.zeros(self.input_shape, np.float32))  # warm up, as DeviceRuntime does

    @property
    def points(self) -> list[BundlePoint]:
        return list(self.bundle.points)

    def point(self, key: str | int) -> BundlePoint:
        """A split point by name or index; raises ``UnknownSplitPointError``."""
        return self.bundle.point(key)

    def middle_point(self) -> BundlePoint:
        points = self.bundle.points
        return points[len(points) // 2]

    def prepare(self, crop: Image.Image) -> np.ndarray:
        """A center crop as the model's input batch of one (``shared.preprocess.to_array``)."""
        return to_array(crop, self.preprocessing)

    def run_full(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)`` of the whole model for a float32 ``(N, 3, H, W)`` batch."""
        (logits,) = self._run(self.bundle.full[self.precision], [self._output], {self._input: x})
        return logits

    def run_head(self, point: BundlePoint, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """The arrays crossing ``point``, in the order ``run_tail`` and the service take them."""
        names = [t.name for t in point.tensors]
        return tuple(self._run(point.head[self.precision], names, {self._input: x}))

    def run_tail(self, point: BundlePoint, arrays: Sequence[np.ndarray]) -> np.ndarray:
        if len(arrays) != len(point.tensors):
            raise ConfigError(f"{point.name!r} takes {len(point.tensors)} tensors, "
                              f"got {len(arrays)}")
        feed = {t.name: a for t, a in zip(point.tensors, arrays, strict=True)}
        (logits,) = self._run(point.tail, [self._output], feed)
        return logits

    def encode(self, point: BundlePoint, arrays: Sequence[np.ndarray], request_id: str,
               options: EncodeOptions | None = None) -> bytes:
        """Quantize, compress and frame the arrays crossing ``point`` (``DeviceRuntime.encode``).

        ``options`` is a ``device_client.runtime.EncodeOptions`` (its granularity and zstd level).
        """
        granularity = options.granularity if options is not None else "auto"
        level = options.zstd_level if options is not None else 3

        def per_channel(a: np.ndarray) -> bool:
            if granularity == "auto":
                return codec.prefers_per_channel_array(a)
            return granularity == "channel" and a.ndim >= 2

        return wire.encode(wire.Frame(
            model=self.name, fingerprint=self.fingerprint, split=point.name,
            request_id=request_id,
            tensors=tuple(codec.encode_array(a, per_channel=per_channel(a), level=level)
                          for a in arrays)))

    def _run(self, file_name: str, outputs: list[str], feed: dict[str, np.ndarray]
             ) -> list[np.ndarray]:
        session = self._sessions.get(file_name)
        if session is None:
            session = open_session(self.bundle.path(file_name), threads=self.threads)
            self._sessions[file_name] = session
        result: list[np.ndarray] = session.run(outputs, feed)
        return result
