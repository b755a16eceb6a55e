"""MobileNetV2 (Sandler et al. 2018), module for module and key for key torchvision's.

A torchvision ``mobilenet_v2`` checkpoint loads with ``strict=True``: ``features.0.0.weight``,
``features.1.conv.0.0.weight``, ..., ``features.18.1.running_var``, ``classifier.1.weight``.

    >>> model = mobilenet_v2()
    >>> model.eval()(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import torch
from torch import nn

from shared.models._init import init_weights

__all__ = ["Conv2dNormActivation", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expand ratio t, output channels c, repeats n, first stride s): Table 2 of the paper.
_INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    # From the TF reference (and torchvision): round to a multiple of divisor, never dropping
    # more than 10% below value.
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class Conv2dNormActivation(nn.Sequential):
    """Conv (bias-free), BatchNorm, ReLU6; "same" padding for odd kernels. Keys ``0.*``, ``1.*``.

    ReLU6 is not in-place: an fx interpreter that keeps every intermediate value (to measure or
    send a split tensor) would otherwise see the BatchNorm output overwritten.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when ``expand_ratio`` is 1), 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A fixed attribute, so fx traces the branch taken as structure, not data.
        out: torch.Tensor = self.conv(x)
        if self.use_res_connect:
            return x + out
        return out


class MobileNetV2(nn.Module):
    """``features`` (19 stages), global average pool, ``classifier`` (dropout, linear)."""

    def __init__(
        self, *, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        init_weights(self, conv_mode="fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        logits: torch.Tensor = self.classifier(x)
        return logits


def mobilenet_v2(
    *, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV2:
    """MobileNetV2 with random weights; load a torchvision checkpoint through ``get_model``.

    >>> mobilenet_v2().state_dict()["classifier.1.weight"].shape
    torch.Size([1000, 1280])
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout)
