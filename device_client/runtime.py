"""The model on the device: weights, split points, and heads/tails built on first use."""

from __future__ import annotations

import torch
from PIL import Image
from torch import fx, nn

from device_client.options import EncodeOptions
from shared import codec_torch, wire
from shared.models import ModelSpec, fingerprint, get_model, get_spec, imagenet_labels
from shared.models.registry import Weights
from shared.partition import Partitioner, SplitPoint
from shared.preprocess import Preprocessing, to_tensor

__all__ = ["DeviceRuntime", "EncodeOptions"]


class DeviceRuntime:
    """One model as the device holds it. The device always has the whole model: it runs the
    head, and the tail too when the service can't answer.

        >>> rt = DeviceRuntime("efficientnet_lite0")
        >>> head, tail = rt.halves(rt.point("_blocks.5"))
    """

    kind = "torch"  # the runtime, as profiles record it
    precision = "fp32"

    def __init__(self, name: str, *, weights: Weights | None = None) -> None:
        self.name = name
        self.spec: ModelSpec = get_spec(name)
        self.model: nn.Module = get_model(name, weights=weights)
        self.fingerprint = fingerprint(self.model)
        self.labels = imagenet_labels() if self.spec.num_classes == 1000 else tuple(
            f"class {i}" for i in range(self.spec.num_classes))
        self.partitioner = Partitioner(self.model, torch.zeros(self.spec.input_shape))
        self._halves: dict[str, tuple[fx.GraphModule, fx.GraphModule]] = {}
        self.run_full(torch.zeros(self.spec.input_shape))  # warm up, as in halves()

    @property
    def points(self) -> list[SplitPoint]:
        return self.partitioner.points

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    def prepare(self, crop: Image.Image) -> torch.Tensor:
        """A center crop as the model's input batch of one."""
        return to_tensor(crop, self.spec.preprocessing)

    def point(self, key: str | int) -> SplitPoint:
        """A split point by name or index; raises UnknownSplitPointError."""
        return self.partitioner.point(key)

    def middle_point(self) -> SplitPoint:
        points = self.points
        return points[len(points) // 2]

    def halves(self, point: SplitPoint) -> tuple[fx.GraphModule, fx.GraphModule]:
        if point.name not in self._halves:
            head, tail = self.partitioner.split(point)
            # One untimed pass: the first call of a fresh GraphModule pays one-off costs (lazy
            # kernels, allocator growth) that would otherwise land in the first image's timings.
            with torch.inference_mode():
                tail(*head(torch.zeros(self.spec.input_shape)))
            self._halves[point.name] = (head, tail)
        return self._halves[point.name]

    def run_full(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.model(x)
        return out

    def run_head(self, point: SplitPoint, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        head, _ = self.halves(point)
        with torch.inference_mode():
            out: tuple[torch.Tensor, ...] = head(x)
        return out

    def run_tail(self, point: SplitPoint, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        _, tail = self.halves(point)
        with torch.inference_mode():
            out: torch.Tensor = tail(*tensors)
        return out

    def encode(self, point: SplitPoint, tensors: tuple[torch.Tensor, ...], request_id: str,
               options: EncodeOptions | None = None) -> bytes:
        """Quantize, compress and frame the activations crossing ``point``."""
        options = options or EncodeOptions()
        return wire.encode(wire.Frame(
            model=self.name, fingerprint=self.fingerprint, split=point.name,
            request_id=request_id,
            tensors=tuple(codec_torch.encode_tensor(t, per_channel=options.per_channel(t),
                                              level=options.zstd_level) for t in tensors)))
